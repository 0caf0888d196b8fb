"""The ops: one folder per op (``moment/``, ``generator/``), the backend chosen by :mod:`.dispatch`.

Each op folder has the same files: ``api.py`` (public entry points), ``reference.py`` (plain
PyTorch, the float64 oracle), ``custom_op.py`` (``torch.library`` custom ops with fake
implementations and autograd), ``dispatch.py`` (each backend's dispatch entries) and
``backends/<name>.py`` (when a compiled backend serves, and its launchers). Shared:
``dispatch.py`` (the registry and the choice), ``extensions.py`` (building csrc/),
``triton_runtime.py`` (whether Triton can serve a tensor). The kernels sit below, in
``fastdfd.kernels`` and ``csrc/``, and import nothing from here.
"""

from .moment.api import (
    REDUCTIONS,
    bn_moment_loss,
    check_kind,
    check_moment_input,
    check_running_stats,
    moment_finalize,
    moment_sums,
    moment_tap,
)
from .moment.packed import PackedLayout
from .moment.reference import KINDS

__all__ = [
    "KINDS",
    "REDUCTIONS",
    "PackedLayout",
    "bn_moment_loss",
    "check_kind",
    "check_moment_input",
    "check_running_stats",
    "moment_finalize",
    "moment_sums",
    "moment_tap",
]
