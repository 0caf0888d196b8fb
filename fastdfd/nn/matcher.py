"""MomentMatcher: the drop-in replacement for DeepInversion-style BN forward hooks.

    with MomentMatcher(teacher, kind="kl") as matcher:
        logits = teacher(images)
        loss = matcher.loss() + F.cross_entropy(logits, labels)

Attaching swaps every BatchNorm layer of the teacher (every flavour of torch, torchvision and
timm: :mod:`.flavours`) for a :class:`BNTap` that computes the layer's output and its moment
sums, in one op where the layer is eval-mode BN. After a forward, all
layers' sums are packed into one [G, C_total] buffer and every distance is evaluated by
one ``moment_finalize`` call; no per-layer loop of small ops in the loss.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..ops import KINDS, PackedLayout, check_kind, check_running_stats, moment_finalize
from ..settings.generator import NORMALIZATIONS, SCOPES  # the choices live with the settings
from .flavours import Flavour, class_name, flavour_of, is_uninitialized_lazy
from .epilogue import Fusion
from .epilogue import fuse_epilogues as fuse
from .moment_record import MomentRecord
from .tap import BNTap


def _batchnorm_layers(teacher: nn.Module) -> list[tuple[str, nn.Module, Flavour]]:
    """Unique BN layers in registration order (a module used twice is one layer), with their flavours."""
    seen: dict[int, tuple[str, nn.Module, Flavour]] = {}
    for name, module in teacher.named_modules():
        if isinstance(module, BNTap):
            raise RuntimeError(f"a MomentMatcher is already attached to this teacher (layer {name!r})")
        flavour = flavour_of(module)
        if flavour is not None and id(module) not in seen:
            if is_uninitialized_lazy(module):
                raise ValueError(f"BatchNorm layer {name!r} ({type(module).__name__}) is lazy and has not seen an "
                                 "input yet: run one forward through the teacher before attaching")
            seen[id(module)] = (name, module, flavour)
    return list(seen.values())


def _has_running_stats(module: nn.Module) -> bool:
    return getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None


class MomentMatcher:
    """Moment-matching loss over every BN layer of ``teacher``.

    Args:
        teacher: any module with BatchNorm layers that carry running statistics.
        kind: moment distance, one of ``kl`` (default), ``kl_reverse``, ``l2``, ``mse``.
        scope: ``ensemble`` (one set of statistics over the whole batch) or ``generator``
            (the batch split into ``groups`` contiguous segments, one loss per segment).
        groups: number of segments for ``scope="generator"``; may also be set later via
            the ``groups`` attribute (e.g. when the number of generators per step changes).
        layer_weights: per-layer weights, a sequence in layer order or a mapping from the
            BN module's qualified name; missing names weigh 1.
        first_layer_multiplier: extra factor on the first BN layer (DeepInversion uses 10).
        normalization: ``"sum"`` (default; each layer's distance summed over its channels, the layers
            summed: the paper's and DeepInversion's form, whose scale grows with the teacher's width and
            depth) or ``"mean"`` (scale-free: each layer's distance averaged over its C_l channels and
            the L layers averaged). Per kind, the factor on layer l under ``"mean"`` is
            ``kl``/``kl_reverse``: 1/(C_l * L) (the mean per-channel KL); ``l2``: 1/(sqrt(C_l) * L)
            (the two norms become root-mean-square differences); ``mse``: 1/L (already a mean over
            channels). The factors are folded into the per-layer weight vector applied after the one
            finalize launch (no per-layer work in the step), after ``layer_weights`` and
            ``first_layer_multiplier``. Source: the probe on the pretrained EfficientNet-Lite0 in the
            method notes (docs/method.md section 9: the summed KL, about 1e4 over 49 layers, drowned the cross-entropy;
            the mean form with moment weight 1 did not). :meth:`layer_losses` stays unweighted (summed form).
        skip_without_stats: leave BN layers without running statistics (``track_running_stats=False``)
            in place and out of the loss, with one warning listing them; by default they are refused
            (ValueError naming the layer).
        fuse_epilogues: trace the teacher once (``torch.fx``) and let each tap apply the activation that
            follows its BN layer in the same pass, forward and backward, taking it out of the teacher's
            forward while attached (:mod:`.epilogue`; ``fusion`` says which layers, or why none). A teacher
            that cannot be traced, and every chain the taps do not fuse, runs as without it. The outputs
            are the teacher's within fp32 rounding either way.

    Layers found: ``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, materialised lazy BN, torchvision's
    ``FrozenBatchNorm2d`` and timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` / ``FrozenBatchNormAct2d``
    (their activation and drop run after the tap's output), computed by the fused tap; any other
    ``_BatchNorm`` subclass that overrides ``forward`` runs its own forward, the sums taken from its
    input (one warning naming the class). A layer in training mode likewise runs its own forward.
    With a matcher attached the teacher's outputs are its outputs without one. ``flavours`` maps each
    layer to how it is tapped.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        kind: str = "kl",
        scope: str = "ensemble",
        groups: int | None = None,
        layer_weights: Sequence[float] | Mapping[str, float] | None = None,
        first_layer_multiplier: float = 1.0,
        skip_without_stats: bool = False,
        normalization: str = "sum",
        fuse_epilogues: bool = True,
    ):
        self.kind = check_kind(kind)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
        self.normalization = normalization
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
        if scope == "ensemble" and groups not in (None, 1):
            raise ValueError("groups only applies to scope='generator'")
        self.scope = scope
        self.teacher = teacher
        # With scope="ensemble" under torch.distributed: the sums of every rank's images are
        # added before the finalize, so the loss is that of the global batch (fastdfd.distributed).
        self.distributed = None

        layers = _batchnorm_layers(teacher)
        if not layers:
            raise ValueError(
                f"{type(teacher).__name__} has no BatchNorm layer: moment matching needs the running statistics "
                "stored in BatchNorm layers (BatchNorm1d/2d/3d, SyncBatchNorm, torchvision FrozenBatchNorm2d, "
                "timm BatchNormAct2d/FrozenBatchNormAct2d)"
            )
        without = [name for name, bn, _ in layers if not _has_running_stats(bn)]
        if without and skip_without_stats:
            warnings.warn(f"fastdfd: MomentMatcher leaves {len(without)} BatchNorm layer(s) without running "
                          f"statistics untouched and out of the loss: {without}", RuntimeWarning, stacklevel=2)
            layers = [layer for layer in layers if layer[0] not in without]
            if not layers:
                raise ValueError(f"none of the BatchNorm layers of {type(teacher).__name__} has running statistics")
        elif without:
            raise ValueError(f"BatchNorm layer {without[0]!r} has no running statistics (track_running_stats=False): "
                             "nothing to match; MomentMatcher(..., skip_without_stats=True) leaves such layers out of the "
                             "loss (the trainers take none: give the layer running statistics, e.g. "
                             "track_running_stats=True and one pass over calibration data)")
        for name, bn, _ in layers:
            check_running_stats(bn.running_mean, bn.running_var, name)
        self._warn_zero_variances(layers)
        for cls in sorted({class_name(bn) for _, bn, flavour in layers if not flavour.fused}):
            warnings.warn(f"fastdfd: {cls} overrides BatchNorm's forward; its layers run their own forward and the "
                          "moment sums are taken from their input (exact, one more read of each input)",
                          RuntimeWarning, stacklevel=2)
        self.layer_names = [name for name, _, _ in layers]
        self.flavours = {name: flavour.name for name, _, flavour in layers}
        self.weights = self._layer_weights(layer_weights, first_layer_multiplier) * self._normalization_factors(
            [bn.running_mean.numel() for _, bn, _ in layers])
        # The statistics as they are now: a teacher in training mode moves its own, the loss does not.
        self._stats = [(bn.running_mean.detach().clone(), bn.running_var.detach().clone(), float(bn.eps))
                       for _, bn, _ in layers]
        self._cache: dict[tuple, tuple[PackedLayout, torch.Tensor, torch.Tensor]] = {}
        # the buffer the taps write into; this matcher clears it per forward and reads it in loss()
        self.record = MomentRecord([mean for mean, _, _ in self._stats])
        self.groups = groups
        self._result: tuple | None = None  # the finalized losses of the record's sums (stale once it changes)

        self._swaps: list[tuple[nn.Module, str, BNTap]] = []
        taps = {id(bn): BNTap(bn, slot, self.record, flavour) for slot, (_, bn, flavour) in enumerate(layers)}
        for parent in teacher.modules():
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) in taps:
                    parent._modules[child_name] = taps[id(child)]
                    self._swaps.append((parent, child_name, taps[id(child)]))
        self._hook = teacher.register_forward_pre_hook(self._start_forward)
        by_name = {name: taps[id(bn)] for name, bn, _ in layers}
        self.fusion = (fuse(teacher, by_name, self.record) if fuse_epilogues
                       else Fusion(reason="fuse_epilogues=False"))

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _warn_zero_variances(layers) -> None:
        """A channel whose running variance is 0 (a pruned or dead filter) divides the moment loss by the
        layer's eps alone: any activity the generators give it dominates every other term. Said once per
        matcher, with the layers and counts (one host read, at construction)."""
        zero = [(name, int((bn.running_var == 0).sum()), bn.running_var.numel()) for name, bn, _ in layers]
        zero = [z for z in zero if z[1]]
        if zero:
            listed = ", ".join(f"{name} ({n} of {c})" for name, n, c in zero[:5])
            warnings.warn(f"fastdfd: {sum(z[1] for z in zero)} BatchNorm channel(s) have running_var = 0: {listed}"
                          f"{' and more' if len(zero) > 5 else ''}. The moment loss divides by var + eps there: harmless "
                          "where the channel is constant (a dead or pruned filter, as in some pretrained networks), "
                          "but any activity the generators give it dominates the loss", RuntimeWarning, stacklevel=3)

    def _layer_weights(self, layer_weights, first_layer_multiplier: float) -> torch.Tensor:
        n = len(self.layer_names)
        if layer_weights is None:
            w = [1.0] * n
        elif isinstance(layer_weights, Mapping):
            unknown = sorted(set(layer_weights) - set(self.layer_names))
            if unknown:
                raise ValueError(f"layer_weights names unknown BN layers {unknown}; layers are {self.layer_names}")
            w = [float(layer_weights.get(name, 1.0)) for name in self.layer_names]
        else:
            w = [float(v) for v in layer_weights]
            if len(w) != n:
                raise ValueError(f"layer_weights has {len(w)} entries but the teacher has {n} BN layers")
        w[0] *= float(first_layer_multiplier)
        return torch.tensor(w, dtype=torch.float64)

    def _normalization_factors(self, channels: list[int]) -> torch.Tensor:
        """Per-layer factors of ``normalization`` (float64, folded into ``self.weights``)."""
        c = torch.tensor(channels, dtype=torch.float64)
        if self.normalization == "sum":
            return torch.ones_like(c)
        per_channel = {"kl": 1 / c, "kl_reverse": 1 / c, "l2": c.rsqrt(), "mse": torch.ones_like(c)}[self.kind]
        return per_channel / len(channels)

    # --------------------------------------------------------------- recording
    @property
    def groups(self) -> int | None:
        """Segments of the batch for ``scope="generator"`` (one per generator); always 1 for ``"ensemble"``."""
        return self.record.groups if self.scope == "generator" else None

    @groups.setter
    def groups(self, value: int | None) -> None:
        self.record.groups = 1 if self.scope == "ensemble" else value

    @property
    def active_groups(self) -> int:
        return self.record.active_groups

    @property
    def enabled(self) -> bool:
        """Whether teacher forwards record their sums (see :meth:`paused`)."""
        return self.record.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.record.enabled = bool(value)

    def _start_forward(self, _module, _inputs) -> None:
        self.record.clear()

    def _packed(self, slots: tuple[int, ...], counts: tuple[int, ...], like: torch.Tensor):
        key = (slots, counts, like.dtype, like.device)
        hit = self._cache.get(key)
        if hit is None:
            stats = [self._stats[s] for s in slots]
            layout = PackedLayout.build(
                [m.to(like.device) for m, _, _ in stats], [v.to(like.device) for _, v, _ in stats],
                [e for _, _, e in stats], dtype=like.dtype,
            )
            weights = self.weights[list(slots)].to(device=like.device, dtype=like.dtype)
            hit = (layout, layout.counts(counts), weights)
            if len(self._cache) > 64:  # shapes vary (e.g. the last, smaller batch); keep it bounded
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def _finalize(self) -> tuple[torch.Tensor, tuple[int, ...]]:
        if self._result is None or self.record.changed:
            sums = self.record.sums
            if not sums:
                raise RuntimeError("no teacher forward recorded since attaching: call teacher(x) before loss()")
            slots = tuple(sorted(sums))
            s1 = torch.cat([sums[s][0] for s in slots], dim=1)
            s2 = torch.cat([sums[s][1] for s in slots], dim=1)
            counts = tuple(sums[s][2] for s in slots)
            if self.distributed is not None and self.scope == "ensemble" and self.distributed.world > 1:
                from ..distributed import sum_over_ranks

                # one collective for all layers' sums; every rank has the same image count
                s1, s2 = sum_over_ranks(torch.cat([s1, s2]), self.distributed).split(s1.shape[0])
                counts = tuple(c * self.distributed.world for c in counts)
            layout, count, weights = self._packed(slots, counts, s1)
            per_layer = moment_finalize(s1, s2, count, layout, self.kind)  # [L, G]
            self._result = (per_layer, slots, weights)
            self.record.changed = False
        return self._result

    # ------------------------------------------------------------------ losses
    def loss(self) -> torch.Tensor:
        """Weighted moment loss of the last teacher forward: a scalar, or [groups] for scope='generator'."""
        per_layer, _, weights = self._finalize()
        total = (weights.unsqueeze(1) * per_layer).sum(dim=0)
        return total[0] if self.scope == "ensemble" else total

    def layer_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted distance per BN layer of the last forward (scalar, or [groups] per layer)."""
        per_layer, slots, _ = self._finalize()
        return {
            self.layer_names[s]: (per_layer[i, 0] if self.scope == "ensemble" else per_layer[i])
            for i, s in enumerate(slots)
        }

    # ---------------------------------------------------------------- lifetime
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Teacher forwards inside compute plain eval-mode BN and record nothing."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @property
    def attached(self) -> bool:
        return bool(self._swaps)

    def remove(self) -> None:
        """Put the original BN modules back, and the teacher's own forward (idempotent)."""
        self.fusion.remove()
        for parent, child_name, tap in reversed(self._swaps):
            parent._modules[child_name] = tap.restore()
        self._swaps = []
        self.record.clear()
        self._result = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> "MomentMatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"MomentMatcher(kind={self.kind!r}, scope={self.scope!r}, normalization={self.normalization!r}, layers={len(self.layer_names)}, "
            f"attached={self.attached})"
        )


__all__ = ["KINDS", "NORMALIZATIONS", "SCOPES", "MomentMatcher"]
