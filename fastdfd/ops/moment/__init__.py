"""The BN moment ops: one folder, every layer of the op (the public API is :mod:`fastdfd.ops`'s).

- ``api.py``: the public entry points (``moment_sums``, ``moment_tap``, ``moment_finalize``,
  ``bn_moment_loss``) and their input checks;
- ``reference.py``: the math in plain PyTorch, checkable in float64 (the ``torch`` backend);
- ``packed.py``: :class:`PackedLayout`, many layers' statistics packed for one finalize;
- ``custom_op.py``: the fused ops as ``torch.library`` custom ops, with fake implementations
  and autograd formulas;
- ``decomposition.py``: the tap's custom ops decomposed into aten ops for inductor, so that
  ``torch.compile`` fuses the tap with its neighbours;
- ``dispatch.py``: each backend's dispatch entries;
- ``backends/{triton,cpp,cuda}.py``: when each compiled backend serves, and its launchers
  (kernels in ``kernels/moment/``, ``csrc/moment/``).
"""
