"""The falconet dispatcher: task queue, executor registry and result routing."""
