"""What a generator ensemble is and what its training minimises and how: architecture, loss, optimiser.

The loss is that of docs/method.md section 5 (the moment distance of every BN layer of the teacher plus the
cross-entropy of the intended class, and the optional image priors and method terms); the defaults are the
library's measured ones (docs/generators.md), the paper's are ``preset("paper")`` (:mod:`.presets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..ops import KINDS
from .field import Settings, setting

__all__ = ["NORMALIZATIONS", "SCOPES", "ArchitectureSettings", "LossSettings", "OptimizerSettings"]

SCOPES = ("ensemble", "generator")
NORMALIZATIONS = ("sum", "mean")


@dataclass(frozen=True)
class ArchitectureSettings(Settings):
    """The generators' shape (DAFL's generator, batched over the ensemble: :class:`fastdfd.nn.GeneratorEnsemble`).

    These fix the parameter layout: they are in the ensemble's own config, not in a trainer's."""

    latent_dim: int = setting(100, "z dimension", kind="int", minimum=1, config=False)
    widths: tuple[int, ...] = setting((128, 64), "channels of the first layer's output and of each upsampling conv",
                                      kind="ints", config=False)
    output_bn: bool = setting(False, "the paper's final scale-only BN after tanh (off: it cost 22 points in the "
                                     "project's ablation, docs/ablations.md)", kind="bool", config=False)


@dataclass(frozen=True)
class LossSettings(Settings):
    """The generator loss of one step (docs/method.md section 5): per generator k,

        L_k = moment_weight * D_k + ce_weight * CE_k + tv_weight * TV_k + l2_weight * mean(x_k^2)
              - adversarial_weight * KL(T(x_k) || S(x_k)) [* agree] + diversity_weight * MS_k

    with D the weighted moment distance over the teacher's BN layers (:class:`fastdfd.nn.MomentMatcher`),
    every term on the teacher's input x_k: the generator's images, jittered and flipped when ``jitter`` /
    ``flip`` are set (:func:`fastdfd.train.augment.jitter_flip`). ``agree`` is 1 on an image whose top class the
    student shares with the teacher and 0 elsewhere when ``adversarial_mask`` is set (Fang et al. 2021, CMI;
    Fang et al. 2022, FastDFKD), 1 everywhere when not (DFAD's unbounded term).
    Every weight is >= 0."""

    kind: str = setting("kl", "moment distance (docs/method.md section 3)", kind="str", choices=tuple(KINDS))
    scope: str = setting("ensemble", "statistics over the whole step's images (ensemble: the class mixture the "
                                     "running statistics describe) or per generator", kind="str", choices=SCOPES)
    normalization: str = setting("mean", "sum: each BN layer's distance summed over its channels, the layers summed "
                                         "(the paper's; grows with the teacher's width and depth); mean: averaged "
                                         "over channels and layers (docs/method.md section 4)", kind="str",
                                 choices=NORMALIZATIONS, absent="sum")
    moment_weight: float = setting(10.0, "weight of the BN moment distance", kind="float", minimum=0)
    ce_weight: float = setting(0.1, "weight of the teacher's cross-entropy against the intended class", kind="float",
                               minimum=0)
    tv_weight: float = setting(0.0, "weight of the total-variation image prior", kind="float", minimum=0)
    l2_weight: float = setting(0.0, "weight of the L2 image prior, the mean square of the teacher's input "
                                    "(DeepInversion's)", kind="float", minimum=0, absent=0.0)
    adversarial_weight: float = setting(0.0, "weight of the student's disagreement with the teacher, maximised "
                                             "(DFAD / CMI; needs a student)", kind="float", minimum=0, absent=0.0)
    adversarial_mask: bool = setting(False, "count the disagreement only on images whose top class the student still "
                                            "shares with the teacher (CMI's and FastDFKD's mask): the term stops "
                                            "pushing an image once the student gets it wrong, so it cannot drag the "
                                            "images away from the teacher's classes; nothing without "
                                            "adversarial_weight", kind="bool", absent=False)
    diversity_weight: float = setting(0.0, "weight of the mode-seeking term against collapse (Mao et al. 2019; "
                                           "needs batch_size >= 2)", kind="float", minimum=0, absent=0.0)
    jitter: int = setting(0, "DeepInversion's random shift of the teacher's input: each image rolled cyclically by up "
                             "to this many pixels in height and width (Yin et al. 2020 use 30 at 224 px); 0: off",
                          kind="int", minimum=0, absent=0)
    flip: bool = setting(False, "DeepInversion's random horizontal flip of each image before the teacher",
                         kind="bool", absent=False)
    first_layer_multiplier: float = setting(1.0, "extra factor on the first BN layer's distance (DeepInversion "
                                                 "uses 10)", kind="float", minimum=0)
    layer_weights: tuple[float, ...] | Mapping[str, float] | None = setting(
        None, "per-BN-layer weights: one per layer in order, or layer name = weight (missing names weigh 1); "
              "unset: all 1", kind="layer_weights", absent=None)


@dataclass(frozen=True)
class OptimizerSettings(Settings):
    """Adam per generator (:class:`fastdfd.train.optim.StackedAdam`) and the images each step gives each."""

    lr: float = setting(1e-2, "Adam learning rate (one Adam per generator)", kind="float", above=0)
    betas: tuple[float, float] = setting((0.5, 0.999), "Adam's beta1, beta2", kind="floats", length=2, minimum=0)
    batch_size: int = setting(32, "images per generator per step", kind="int", minimum=1)

    def _check(self) -> None:
        if not all(b < 1 for b in self.betas):
            raise ValueError(f"OptimizerSettings.betas = {self.betas}: each must be in [0, 1)")
