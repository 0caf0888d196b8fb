"""Triton kernels of fastdfd, installed as ``fastdfd.kernels``.

- ``moment_tap``: eval-mode BN output + shifted power sums in one read of x, and the
  single-pass backward;
- ``moment_finalize``: every BN layer's moment distance from one packed buffer, one launch;
- ``aot``: ahead-of-time compilation of every configuration for sm_80/sm_90 (no GPU needed),
  checked against ``aot_rules`` (no compile error, no spill, <= 240 registers);
  ``aot_versions`` runs it under several Triton releases (``make test-triton``).

``fastdfd.ops.reference`` is the specification these kernels implement; the custom ops
that call them live in ``fastdfd.ops.fused`` and ``fastdfd.ops.triton_backend``.
"""
