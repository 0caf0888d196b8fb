"""The generator kernels: linear_gather.py and conv.py (Triton), layout.py (their contract; no triton)."""
