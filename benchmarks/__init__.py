"""Benchmarks and the training comparison (run as ``python -m benchmarks.<name>``)."""
