"""Benchmarks of lmdfx: overhead, naive per-component execution, Captum, scaling.

Each module runs as ``python -m benchmarks.NAME`` (see benchmarks/README.md).
"""
