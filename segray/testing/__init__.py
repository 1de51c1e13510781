"""Helpers for tests and benchmarks: real files and real local clusters, never mocks.

Not imported by the library itself (the layers contract in pyproject.toml keeps it so).
"""
