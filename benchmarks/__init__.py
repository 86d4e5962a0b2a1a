"""falconet's benchmark harness (``falconet bench``): throughput, latency, memory, scale, peers."""
