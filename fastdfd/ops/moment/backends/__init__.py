"""Each compiled backend of the moment ops: when it can serve a tensor (``check``) and its launchers.

``triton.py`` (kernels/moment/), ``cpp.py`` (csrc/moment/moment_cpu.cpp), ``cuda.py``
(csrc/moment/moment_cuda.cu). The custom ops (``custom_op.py``) call the launchers; the
dispatch entries (``dispatch.py``) ask ``check``.
"""
