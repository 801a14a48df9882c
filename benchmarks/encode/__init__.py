"""Benchmark: SEG + SR for a 300-slice 512x512 CT with three labels.

Run with ``python -m benchmarks.encode``.
"""
