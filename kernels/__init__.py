"""Triton kernels of fastdfd, installed as ``fastdfd.kernels``: the bottom layer.

One folder per op, each kernel beside its launcher (the launcher checks every operand, then
launches on the operands' device):

- ``moment/``: ``tap.py`` (eval-mode BN output + shifted power sums in one read of x, and
  the single-pass backward), ``finalize.py`` (every BN layer's moment distance from one
  packed buffer, one launch), ``layout.py`` (the distance kinds and the strided layout every
  moment kernel takes, the C++/CUDA ones of ``csrc/moment/`` too);
- ``generator/``: ``linear_gather.py`` (the first layer of K generators, BN sums in the
  epilogue), ``conv.py`` (the fused prologue + 3x3 conv + statistics, forward and backward),
  ``layout.py`` (the operands' shapes and dtypes, checked);
- ``launch.py``: the operand checks and device choice every launcher uses;
- ``tools/``: ahead-of-time compilation of every configuration for sm_80/sm_90 (no GPU
  needed), checked against ``aot_rules`` (no compile error, no spill, <= 240 registers);
  ``aot_versions`` runs it under several Triton releases (``make test-triton``).

Nothing here imports the ops layer above it: the specification these kernels implement, the custom
ops that call them and the dispatch that picks them are in the package's ``ops/<op>/``. Importing a
``layout.py`` or ``launch.py`` imports no triton.
"""
