"""Benchmarks of lhcompile on a CUDA GPU (``python -m benchmarks.bench``); not part of the installed package."""
