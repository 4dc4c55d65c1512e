"""Latency benchmarking and serving. Uses :mod:`vqfr` and :mod:`kernels`; neither imports this package."""
