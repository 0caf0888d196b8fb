"""Refusals before the first step: one probe forward of the teacher (and student) on two images.

A set-up that cannot work otherwise fails mid-run with a torch error that names neither
argument ("Target 5 is out of bounds", a conv channel mismatch, a size mismatch in the loss,
an autograd error when the student is the teacher). :func:`probe_teacher` runs the teacher
once, in eval mode and without gradients, on two random images of the generators' shape in
the teacher's input space, and the checks below compare what it returns with the ensemble
and the student, naming both figures.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..input_space import InputSpace
from .modes import in_mode

TEACHER_OUTPUTS = ("logits", "probabilities")
PROBE_BATCH = 2


@dataclass(frozen=True)
class TeacherProbe:
    """What one forward told about the teacher."""

    num_classes: int  # the width of its output rows
    probabilities: bool  # rows non-negative and summing to 1 (it ends in softmax)


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module):
    with in_mode(model, False), torch.no_grad():
        yield model


def _first_conv(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return name, m
    return None


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def probe_images(channels: int, image_size: int, space: InputSpace, model: nn.Module) -> torch.Tensor:
    """Two random images in the model's input space, on its device and in its dtype."""
    device, dtype = _device_dtype(model)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(PROBE_BATCH, channels, image_size, image_size, generator=g)
    return space.normalize(pixels).to(device=device, dtype=dtype)


def _forward(model: nn.Module, x: torch.Tensor, what: str, shape: str) -> torch.Tensor:
    conv = _first_conv(model)
    if conv is not None and conv[1].in_channels != x.shape[1]:
        raise ValueError(f"the generators make {x.shape[1]}-channel images but the {what}'s first convolution "
                         f"{conv[0]!r} takes {conv[1].in_channels} channels")
    try:
        with _eval_no_grad(model):
            out = model(x)
    except Exception as e:
        raise ValueError(f"the {what} ({type(model).__name__}) cannot take the generators' images "
                         f"[N, {shape}]: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the {what} returns {got} for a batch of {x.shape[0]} images; expected class scores "
                         f"[{x.shape[0]}, classes]")
    return out


def probe_teacher(teacher: nn.Module, channels: int, image_size: int, space: InputSpace,
                  teacher_outputs: str = "logits") -> TeacherProbe:
    """One forward of ``teacher`` on two images [2, channels, image_size, image_size] in ``space``.

    Raises ValueError naming both figures when the images do not fit the teacher (channels,
    size) or the teacher does not return [N, classes] rows, and when its rows are probabilities
    but ``teacher_outputs`` is ``"logits"`` (or the reverse).
    """
    if teacher_outputs not in TEACHER_OUTPUTS:
        raise ValueError(f"teacher_outputs must be one of {TEACHER_OUTPUTS}, got {teacher_outputs!r}")
    space.check_channels(channels, "the generators' images")
    shape = f"{channels}, {image_size}, {image_size}"
    out = _forward(teacher, probe_images(channels, image_size, space, teacher), "teacher", shape).float()
    rows = out.sum(dim=1)
    probabilities = bool((out >= 0).all()) and bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-3))
    if probabilities and teacher_outputs == "logits":
        raise ValueError("the teacher's outputs are probabilities (rows non-negative and summing to 1: it ends in "
                         "softmax); cross-entropy and distillation need logits: drop the final softmax, or pass "
                         "teacher_outputs='probabilities' to use their log")
    if not probabilities and teacher_outputs == "probabilities":
        raise ValueError(f"teacher_outputs='probabilities', but the teacher's rows are not probabilities (a row sums "
                         f"to {float(rows[0]):.4g}, min value {float(out.min()):.4g})")
    return TeacherProbe(int(out.shape[1]), probabilities)


def check_ensemble_classes(ensemble, probe: TeacherProbe) -> None:
    """Every class id the ensemble generates must be one of the teacher's outputs."""
    top = int(ensemble.class_ids.max())
    if top >= probe.num_classes:
        raise ValueError(f"the generator ensemble makes class ids up to {top} (num_classes={ensemble.num_classes}) "
                         f"but the teacher has {probe.num_classes} outputs")


def check_student(teacher: nn.Module, student: nn.Module, probe: TeacherProbe, channels: int, image_size: int,
                  space: InputSpace) -> None:
    """The student is a separate network that takes the images and has the teacher's output width."""
    if student is teacher:
        raise ValueError("the student is the teacher (the same module): distillation needs a separate student "
                         "network; build a fresh one (e.g. fastdfd.models.create_model)")
    teacher_params = {id(p) for p in teacher.parameters()}
    shared = [name for name, p in student.named_parameters() if id(p) in teacher_params]
    if shared:
        raise ValueError(f"the student shares {len(shared)} parameter(s) with the teacher (e.g. {shared[0]!r}); "
                         "the teacher must stay frozen: give the student its own copy (copy.deepcopy)")
    shape = f"{channels}, {image_size}, {image_size}"
    out = _forward(student, probe_images(channels, image_size, space, student), "student", shape)
    if out.shape[1] != probe.num_classes:
        raise ValueError(f"the student has {out.shape[1]} outputs but the teacher has {probe.num_classes}")


def check_finite_weights(model: nn.Module, what: str) -> None:
    """ValueError naming the first parameter or buffer of ``model`` holding NaN or Inf (a broken checkpoint
    would otherwise show as a non-finite loss at the first step, blamed on the learning rate). One host
    read for the whole model."""
    tensors = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_floating_point() and t.device.type != "meta"]  # meta tensors have no values to read
    if not tensors or bool(torch.stack([t.detach().isfinite().all() for _, t in tensors]).all()):
        return
    bad = next(n for n, t in tensors if not bool(t.detach().isfinite().all()))
    raise ValueError(f"the {what}'s {bad} holds NaN or Inf: its weights are broken (check the file they came from)")


def check_placement(ensemble, models: dict, *, check_device: bool = True) -> None:
    """Every model in ``models`` ({"teacher": m, ...}) on the ensemble's device and in its floating dtype,
    else a one-line ValueError naming both (the probe casts its images, so a mismatch would only show at the
    first step, as a raw torch error). ``check_device=False``: dtypes only (offload streams each chunk to
    the teacher's device)."""
    device, dtype = ensemble.fc_z.device, ensemble.fc_z.dtype
    for what, model in models.items():
        m_device, m_dtype = _device_dtype(model)
        if check_device and m_device != device:
            raise ValueError(f"the {what} is on {m_device} but the generator ensemble is on {device}: put both on one "
                             f"device ({what}.to({str(device)!r}))")
        if m_dtype != dtype:
            raise ValueError(f"the {what} is {str(m_dtype).replace('torch.', '')} but the generator ensemble is "
                             f"{str(dtype).replace('torch.', '')}: give them one dtype ({what}.to("
                             f"{dtype}) or ensemble.to({m_dtype})); for bf16 compute keep both float32 and "
                             "train with autocast=True")


def as_logits(outputs: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """The teacher's rows as logits: log-probabilities for a softmax teacher (same softmax), else unchanged."""
    if not probabilities:
        return outputs
    return outputs.float().clamp_min(torch.finfo(torch.float32).tiny).log()


__all__ = ["TEACHER_OUTPUTS", "TeacherProbe", "as_logits", "check_ensemble_classes", "check_student",
           "probe_teacher"]
