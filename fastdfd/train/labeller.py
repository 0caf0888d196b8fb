"""The teacher as the distiller asks it for labels: a copy with each eval BatchNorm folded into its convolution.

A distillation step asks the frozen teacher for its logits on the step's images (fresh or mixed ones), a
forward with no gradient and no BN statistics to tap. In eval mode a BatchNorm after a convolution is an
affine map of that convolution's output, so it folds into the convolution's weight and bias (Ioffe and
Szegedy 2015, sec. 3.1: inference BN is a linear transform; the fold is ``torch.nn.utils.fusion``'s
``fuse_conv_bn_eval``), and the forward skips one read and one write of every BN layer's activations. On the
CPU the copy also keeps its weights channels_last (oneDNN's faster layout for these convolutions). The
CIFAR-10 benchmark's distillation step (pretrained ResNet-56 labelling 130 CutMix images, a ResNet-20 update),
2-core AMD EPYC (AVX2): 615 ms as before, 574 ms with these labels (``python -m benchmarks.distill_step``,
docs/cifar10.md). With ``autocast`` the answering forward runs in bf16: on a 2-core AMD EPYC with AVX-512 BF16 the
same step (the student channels_last too) took 306 ms against 381 ms (1.24x, interleaved, 2026-12-07); where the
CPU has no bf16 instructions it is 4.6x slower instead (AVX2, :mod:`fastdfd.train.bf16`), and the labeller warns.

The copy is made by ``torch.fx.experimental.optimization.fuse``: it traces the teacher and folds a
``nn.BatchNorm*d`` into the ``nn.Conv*d`` (or a ``nn.BatchNorm1d`` into the ``nn.Linear``) before it when that
layer's output is read by the BatchNorm alone, exact types only (timm's ``BatchNormAct2d`` and fastdfd's taps
stay as they are). The copy is used on the CPU only (on a card it would hold a second teacher in memory, and
its speed there is unmeasured). Where the teacher's forward takes optional or keyword arguments (a trace would
fix them), cannot be traced, carries hooks a trace would skip, or where the copy fails or disagrees with the
teacher on a probe batch, the teacher answers as it is, :attr:`TeacherLabeller.reason` says why, and a
warning says it once.

What the copy is checked against: the teacher's state_dict, byte for byte (:func:`fastdfd.rundir.fingerprint`),
its modules (identity and type), their plain Python attributes (the mode, flags a ``forward`` may branch on),
their hook counts and the global module hooks. Outside :meth:`TeacherLabeller.held` every call checks them;
inside it (the distiller holds the teacher frozen for a fit) the first call does. A forward's Python side
effects (a wrapper that records its input in a dict) happen once, while tracing, and never in the copy: such a
teacher wants ``fold_teacher=False``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..nn.epilogue import _has_hooks, _module_state, _positional_only_signature
from ..rundir import fingerprint
from .bf16 import warn_if_bf16_is_slow

__all__ = ["TeacherLabeller", "fold_batchnorms"]

# the copy's output may differ from the teacher's by the rounding of the folded weights; more than this many
# units of the dtype's rounding (and at least 1e-3), relative to the output's scale, means the trace froze
# something the teacher's forward decides at run time (a module called at two sites, one before a BN)
_PROBE_ULPS, _PROBE_RTOL_MIN = 64, 1e-3
_PROBE_IMAGES = 8


def fold_batchnorms(teacher: nn.Module, channels_last: bool = False) -> tuple[nn.Module | None, str]:
    """A traced copy of ``teacher`` (in eval mode) with each BatchNorm folded into the convolution or linear
    layer before it, where that layer's output is read by the BatchNorm alone; its 4-D weights channels_last when
    asked. Returns ``(copy, "")``, or ``(None, reason)`` where the teacher cannot be copied this way (never
    raises for a teacher it cannot trace). The teacher is not changed.

    The copy's tensors are its own, without gradient: use it for labels, never to train.
    Raises ValueError if a module of the teacher is in training mode (its BN would normalise by the batch)."""
    if any(m.training for m in teacher.modules()):
        raise ValueError("fold_batchnorms: the teacher must be in eval mode (a BN layer in training mode "
                         "normalises by the batch, which no folded weight can)")
    if "forward" in teacher.__dict__:
        return None, "the teacher has a forward of its own on the instance, which a trace would not follow"
    if _positional_only_signature(teacher) is None:
        return None, (f"{type(teacher).__name__}.forward takes optional, keyword or variable arguments, which a "
                      "trace would fix")
    hooked = next((name or type(teacher).__name__ for name, m in teacher.named_modules() if _has_hooks(m)), None)
    if hooked is not None:
        return None, f"module {hooked!r} carries hooks, which a traced copy would not call"
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(teacher)  # deep-copies the teacher, then traces the copy
    except Exception as exc:  # noqa: BLE001 (a copy or trace that fails: the teacher answers as it is)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, (f"{type(teacher).__name__} could not be copied and traced by torch.fx "
                      f"({type(exc).__name__}: {first})")
    folded.eval().requires_grad_(False)
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    return folded, ""


def _state_key(model: nn.Module) -> tuple:
    """What a folded copy depends on: the state_dict's bytes, the modules (identity, type), their plain
    attributes and hook counts, and the global hooks."""
    modules = list(model.modules())
    return fingerprint(model), tuple((id(m), type(m)) for m in modules), _module_state(modules)


def _probe_tolerance(dtype: torch.dtype) -> float:
    return max(_PROBE_RTOL_MIN, _PROBE_ULPS * torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


class TeacherLabeller:
    """The frozen teacher's output for a distillation step, from its BN-folded copy where one can be made.

    Args:
        teacher: the teacher; in eval mode whenever the labeller is called (the distiller holds it frozen).
        enabled: False: always the teacher as it is (``DistillSettings.fold_teacher``).
        autocast: True: the answering forward (the copy's, or the teacher's) runs under bf16 autocast on the
            images' device type and a bf16 output is returned as fp32 (``DistillSettings.autocast``). The
            probe that checks the copy against the teacher runs in fp32 either way: the check is of the fold,
            not of bf16's rounding (about 3 significant digits in each logit).

    Call it with images ``x`` ``[N, C, H, W]`` in the teacher's input space, of its dtype and on its device;
    it returns what the teacher returns on them (``[N, classes]`` logits, or probabilities for a teacher that
    outputs them), computed without gradient. Before a copy answers, it is checked against the teacher on the
    first 8 images of the call that made it: within fp32 rounding (64 units of the dtype's rounding, at least
    1e-3, relative to the largest output).
    """

    def __init__(self, teacher: nn.Module, enabled: bool = True, autocast: bool = False):
        self.teacher, self.enabled, self.autocast = teacher, enabled, autocast
        self.reason = "" if enabled else "fold_teacher is off"
        self._copy: nn.Module | None = None
        self._channels_last = False
        self._key: tuple | None = None
        self._holding = self._checked = False
        self._warned: set[str] = set()

    @property
    def folded(self) -> bool:
        """Whether the copy answers (as of the last check)."""
        return self._copy is not None

    @contextlib.contextmanager
    def held(self) -> Iterator["TeacherLabeller"]:
        """Inside, the teacher is taken not to change (a distiller's fit holds it frozen): the copy is checked
        against it on the first call only, not on each."""
        self._holding, self._checked = True, False
        try:
            yield self
        finally:
            self._holding = False

    def _refresh(self, x: torch.Tensor) -> None:
        if x.device.type != "cpu":
            self._copy, self._key = None, None
            self.reason = "the folded copy runs on the CPU only (on a card it would hold a second teacher)"
            return
        try:
            key = _state_key(self.teacher)
        except Exception as exc:  # noqa: BLE001 (a tensor whose bytes cannot be read: no copy is checked)
            self._copy, self._key = None, None
            self._fall_back(f"the teacher's state cannot be fingerprinted ({type(exc).__name__}: {exc})")
            return
        if key == self._key:
            return
        self._key, self._copy = key, None
        if any(m.training for m in self.teacher.modules()):
            self.reason = "the teacher is in training mode (its BN layers normalise by the batch)"
            return
        # channels_last first where it applies; a forward that .view()s its activations refuses that layout,
        # so a copy that fails in it is tried again in the teacher's own
        failure = ""
        for channels_last in ((True, False) if x.dim() == 4 else (False,)):
            folded, reason = fold_batchnorms(self.teacher, channels_last=channels_last)
            if folded is None:
                self._fall_back(reason)
                return
            failure = self._probe(folded, x[:_PROBE_IMAGES], channels_last)
            if not failure:
                self._copy, self._channels_last, self.reason = folded, channels_last, ""
                return
        self._fall_back(failure)

    def _probe(self, folded: nn.Module, probe: torch.Tensor, channels_last: bool) -> str:
        """Why the copy does not answer as the teacher on ``probe`` ("" when it does)."""
        try:
            want = self.teacher(probe)
            got = folded(probe.contiguous(memory_format=torch.channels_last) if channels_last else probe)
        except Exception as exc:  # noqa: BLE001 (e.g. a .view that channels_last activations refuse)
            first = str(exc).splitlines()[0] if str(exc) else ""
            return f"the folded copy fails on a probe batch ({type(exc).__name__}: {first})"
        if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return "the folded copy does not return the teacher's tensor"
        err = float((got.float() - want.float()).abs().max())
        scale = max(1.0, float(want.float().abs().max()))
        if not err <= _probe_tolerance(want.dtype) * scale:  # also NaN
            return (f"the folded copy's output differs from the teacher's by {err:.3g} on a probe batch (a forward "
                    "that a trace cannot stand for)")
        return ""

    def _fall_back(self, reason: str) -> None:
        self.reason = reason
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"fastdfd: the distiller's teacher labels without a folded copy: {reason}", stacklevel=4)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and not (self._holding and self._checked):
            self._refresh(x)  # in fp32, outside the autocast below
            self._checked = self._holding
        if not self.enabled or self._copy is None:
            model = self.teacher
        else:
            model = self._copy
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        if not self.autocast:
            return model(x)
        if "bf16" not in self._warned:  # once: asked for speed, on a CPU where bf16 is the slow path
            self._warned.add("bf16")
            # 4: past this call and torch.no_grad's wrapper, the line that called the labeller
            warn_if_bf16_is_slow(x.device, "the distiller's teacher labelling forward", stacklevel=4)
        with torch.autocast(x.device.type, torch.bfloat16):
            out = model(x)
        # autocast's low-precision outputs back to fp32; a float64 teacher's (autocast leaves it alone) stay as they are
        low = isinstance(out, torch.Tensor) and out.dtype in (torch.bfloat16, torch.float16)
        return out.float() if low else out
