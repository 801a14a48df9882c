"""Benchmark: receiving a CT series (``python -m benchmarks.ingest``)."""
