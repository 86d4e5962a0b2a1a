"""The Python API on an embedded local cluster: python examples/api.py"""

import falconet


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


if __name__ == "__main__":
    with falconet.local(slots=2) as client:
        print("2**10 =", client.submit(pow, 2, 10).result())
        hi = client.submit_command("echo hello from $(hostname)").result()
        print(hi.stdout.strip(), f"(exit {hi.exit_code}, executor {hi.executor})")
        steps = list(client.map(collatz_steps, range(1, 20_001)))
        best = max(range(len(steps)), key=steps.__getitem__)
        print(f"longest Collatz chain below 20,001 starts at {best + 1}: {steps[best]} steps")
        with client.executor() as pool:  # any concurrent.futures consumer works with this
            print(sorted(pool.map(abs, [-3, 1, -2])))
