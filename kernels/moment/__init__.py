"""The moment kernels: tap.py and finalize.py (Triton), layout.py (their contract; no triton)."""
