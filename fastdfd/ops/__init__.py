"""Moment ops (public entry points; backends behind :mod:`fastdfd.backends`)."""

from .layout import PackedLayout
from .moments import (
    REDUCTIONS,
    bn_moment_loss,
    check_kind,
    check_moment_input,
    check_running_stats,
    moment_finalize,
    moment_sums,
    moment_tap,
)
from .reference import KINDS

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
