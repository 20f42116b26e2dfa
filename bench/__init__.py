"""Benchmarks that print speed/memory ratios measured side by side in one run."""
