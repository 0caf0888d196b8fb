"""Each compiled backend of the generator op: when it can serve (``check``) and its launchers.

``triton.py`` (kernels/generator/), ``cpp.py`` (csrc/generator/generator_cpu.cpp). The custom
ops (``custom_op.py``) call the launchers; the dispatch entries (``dispatch.py``) ask ``check``.
"""
