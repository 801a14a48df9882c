"""Reproducible performance runs.

Each ``benchmarks/<name>/`` package runs as ``python -m benchmarks.<name>``.
"""
