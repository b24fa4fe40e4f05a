"""Runnable examples: a policy, a search space, a user workload and the Python API (each run by tests)."""
