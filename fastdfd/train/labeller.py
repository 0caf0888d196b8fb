"""The teacher as the distiller asks it for labels: a copy with each eval BatchNorm folded into its convolution.

A distillation step asks the frozen teacher for its logits on the step's images (fresh or mixed ones), a
forward with no gradient and no BN statistics to tap. In eval mode a BatchNorm after a convolution is an
affine map of that convolution's output, so it folds into the convolution's weight and bias (Ioffe and
Szegedy 2015, sec. 3.1: inference BN is a linear transform; the fold is ``torch.nn.utils.fusion``'s
``fuse_conv_bn_eval``), and the forward skips one read and one write of every BN layer's activations. On the
CPU the copy also keeps its weights channels_last (oneDNN's faster layout for these convolutions). Pretrained
CIFAR ResNet-56, 130 images of 32 px, 2-core AMD EPYC (AVX2), torch 2.13: 466 ms a forward as it is, 340 ms
folded, 297 ms folded and channels_last (docs/cifar10.md).

The copy is traced with ``torch.fx`` (``torch.fx.experimental.optimization.fuse``, which folds only a
BatchNorm whose convolution feeds it alone, and only the exact ``nn.Conv*d`` / ``nn.BatchNorm*d`` types:
timm's ``BatchNormAct2d`` and fastdfd's taps stay as they are). Where the teacher cannot be traced, carries
hooks a trace would lose, or the copy's logits on a probe batch differ from the teacher's by more than fp32
rounding, the teacher answers as it is and :attr:`TeacherLabeller.reason` says why. The copy is made again
whenever a parameter or buffer of the teacher was changed or replaced (their version counters), a module's
mode changed or a hook was added or removed, so it never answers for weights the teacher no longer has. A
forward that reads a plain Python attribute (a float set on a module) is traced with the value it had: change
such an attribute and the copy does not follow (``fold_teacher=False`` then).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TeacherLabeller", "fold_batchnorms"]

# the copy's logits may differ from the teacher's by fp32 rounding of the folded weights; more than this,
# relative to the logits' scale, means the trace froze something the teacher's forward decides at run time
_PROBE_RTOL = 1e-3


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None)
                or getattr(m, "_backward_pre_hooks", None))


def fold_batchnorms(teacher: nn.Module, channels_last: bool = False) -> tuple[nn.Module | None, str]:
    """A traced copy of ``teacher`` (in eval mode) with each BatchNorm folded into the convolution that alone
    feeds it; its 4-D weights channels_last when asked. Returns ``(copy, "")``, or ``(None, reason)`` where the
    teacher cannot be folded this way (never raises for a teacher it cannot trace). The teacher is not changed.

    The copy answers with no gradient only (its weights are detached copies): use it for labels, never to train.
    Raises ValueError if the teacher is in training mode (its BN layers would normalise by the batch)."""
    if teacher.training or any(m.training for m in teacher.modules()):
        raise ValueError("fold_batchnorms: the teacher must be in eval mode (a BN layer in training mode "
                         "normalises by the batch, which no folded weight can)")
    if "forward" in teacher.__dict__:
        return None, "the teacher has a forward of its own on the instance, which a trace would not follow"
    hooked = next((name or type(teacher).__name__ for name, m in teacher.named_modules() if _has_hooks(m)), None)
    if hooked is not None:
        return None, f"module {hooked!r} carries hooks, which a traced copy would not call"
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(teacher)  # deep-copies the teacher before tracing it
    except Exception as exc:  # noqa: BLE001 (any tracing failure: the teacher answers as it is)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"torch.fx could not trace {type(teacher).__name__}.forward ({type(exc).__name__}: {first})"
    folded.eval().requires_grad_(False)
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    return folded, ""


def _state_key(model: nn.Module) -> tuple:
    """What a folded copy depends on: each tensor's storage and version (changed in place or replaced), each
    module's mode, and which modules carry hooks."""
    modules = tuple((m.training, _has_hooks(m)) for m in model.modules())
    return modules, tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


class TeacherLabeller:
    """The frozen teacher's logits for a distillation step, from its folded copy where one can be made.

    Args:
        teacher: the teacher; it must be in eval mode whenever the labeller is called (the distiller holds it
            frozen for its run).
        enabled: False: always the teacher as it is (``DistillSettings.fold_teacher``).

    Call it with images ``x`` ``[N, C, H, W]`` in the teacher's input space, of the teacher's dtype and on its
    device; it returns what the teacher returns on them (logits, or probabilities for a teacher that outputs
    them), computed without gradient. The copy and the teacher agree to fp32 rounding: a probe batch of the
    first call's shape is checked against the teacher before the copy is used.
    """

    def __init__(self, teacher: nn.Module, enabled: bool = True):
        self.teacher, self.enabled = teacher, enabled
        self.reason = "" if enabled else "fold_teacher is off"
        self._copy: nn.Module | None = None
        self._key: tuple | None = None

    @property
    def folded(self) -> bool:
        """Whether the last call answered from the folded copy."""
        return self._copy is not None

    def _refresh(self, x: torch.Tensor) -> None:
        key = _state_key(self.teacher)
        if key == self._key:
            return
        self._key, self._copy = key, None
        if any(training for training, _ in key[0]):
            self.reason = "the teacher is in training mode (its BN layers normalise by the batch)"
            return
        channels_last = x.device.type == "cpu" and x.dim() == 4
        folded, self.reason = fold_batchnorms(self.teacher, channels_last=channels_last)
        if folded is None:
            return
        probe = x[: min(len(x), 8)]
        want = self.teacher(probe)
        got = folded(probe.contiguous(memory_format=torch.channels_last) if channels_last else probe)
        if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != want.shape:
            self.reason = "the folded copy does not return the teacher's tensor"
            return
        scale = want.abs().max().clamp_min(1.0)
        err = (got - want).abs().max()
        if not bool(torch.isfinite(err)) or float(err) > _PROBE_RTOL * float(scale):
            self.reason = (f"the folded copy's output differs from the teacher's by {float(err):.3g} on a probe "
                           "batch (a forward that a trace cannot stand for)")
            return
        self._copy, self._channels_last = folded, channels_last

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.teacher(x)
        self._refresh(x)
        if self._copy is None:
            return self.teacher(x)
        return self._copy(x.contiguous(memory_format=torch.channels_last) if self._channels_last else x)
