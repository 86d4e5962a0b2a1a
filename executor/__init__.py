"""The falconet executor: pulls tasks from the dispatcher and runs them in slots."""
