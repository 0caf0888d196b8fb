"""The batched generator-ensemble op: one folder, every layer of the op.

The same files as ``ops/moment/``: ``api.py`` (``ensemble_forward``), ``reference.py``
(plain PyTorch, the float64 oracle, and single-layer references of what the kernels fuse),
``custom_op.py`` (the fused layers as ``torch.library`` custom ops with fake implementations
and autograd, and their composition into a forward), ``dispatch.py`` (each backend's entry)
and ``backends/{triton,cpp}.py`` (kernels in ``kernels/generator/``, ``csrc/generator/``).
"""

from .api import ensemble_forward

__all__ = ["ensemble_forward"]
