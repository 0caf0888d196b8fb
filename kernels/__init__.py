"""Triton kernels of fastdfd, installed as ``fastdfd.kernels``.

Empty until the fused moment tap lands (step 2); the ``torch`` backend in
``fastdfd.ops.reference`` is the specification these kernels will implement.
"""
