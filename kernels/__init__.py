"""Triton kernels of bmt_fast, installed as bmt_fast.kernels (a top-level `kernels` package would clash
with an existing PyPI package)."""
