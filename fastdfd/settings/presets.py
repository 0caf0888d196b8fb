"""Named generator settings: the paper's next to this library's defaults, so the difference is visible.

    from fastdfd.settings import preset
    s = preset("paper")
    ensemble = GeneratorEnsemble(K, classes, image_size=32, channels=3, architecture=s.architecture)
    trainer = GeneratorTrainer(teacher, ensemble, loss=s.loss, optimizer=s.optimizer)

``paper``: Luo, Sandler et al. (2020) as docs/method.md sections 5-6 hold it (the DAFL generator with its scale-only
output BN, widths 128/64, latent 100; KL summed over every BN channel and layer, per-generator statistics,
moment weight 10 against cross-entropy 1, Adam lr 1e-3, betas (0.5, 0.999), 64 images per generator per step).
``default``: every settings class's own defaults (the scale-free loss: each BN layer's KL averaged over its
channels, the layers averaged; statistics over the whole ensemble's batch; moment weight 10 against
cross-entropy 0.1; Adam lr 1e-2; no output BN). Measured in docs/generators.md on the digits CNN and the
pretrained EfficientNet-Lite0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .field import Settings
from .generator import ArchitectureSettings, LossSettings, OptimizerSettings

__all__ = ["GeneratorSettings", "PRESETS", "preset", "split_settings"]


def split_settings(changes: dict[str, Any], *classes: type[Settings]) -> list[dict[str, Any]]:
    """``changes`` split by the settings class that has each name (one dict per class, in order); a name no
    class has is a TypeError listing every known name. The classes' field names must not overlap."""
    parts: list[dict[str, Any]] = [{} for _ in classes]
    owner = {name: i for i, cls in enumerate(classes) for name in cls.field_names()}
    unknown = sorted(set(changes) - set(owner))
    if unknown:
        known = ", ".join(sorted(owner))
        raise TypeError(f"unknown setting(s) {unknown}; the settings here are {known}")
    for name, value in changes.items():
        parts[owner[name]][name] = value
    return parts


@dataclass(frozen=True)
class GeneratorSettings:
    """The generator settings a preset fixes: the architecture, the loss and the optimiser."""

    architecture: ArchitectureSettings = field(default_factory=ArchitectureSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)

    CLASSES = (ArchitectureSettings, LossSettings, OptimizerSettings)

    def replace(self, **changes: Any) -> "GeneratorSettings":
        """A copy with each named field changed in the part that holds it (``lr=1e-3``, ``output_bn=True``)."""
        arch, loss, opt = split_settings(changes, *self.CLASSES)
        return GeneratorSettings(self.architecture.replace(**arch), self.loss.replace(**loss),
                                 self.optimizer.replace(**opt))

    def as_dict(self) -> dict[str, Any]:
        return {**self.architecture.as_dict(), **self.loss.as_dict(), **self.optimizer.as_dict()}


PRESETS: dict[str, GeneratorSettings] = {
    "paper": GeneratorSettings(
        ArchitectureSettings(output_bn=True),
        LossSettings(scope="generator", normalization="sum", ce_weight=1.0),
        OptimizerSettings(lr=1e-3, batch_size=64),
    ),
    # measured (docs/generators.md): teacher top-1 on generated digits 99.8-100% (3 seeds), EfficientNet-Lite0
    # 78% after 750 steps (seed 0); the paper's preset gives chance on both
    "default": GeneratorSettings(),
}


def preset(name: str) -> GeneratorSettings:
    """A named preset (``paper``, ``default``); an unknown name lists the known ones (ValueError)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown generator preset {name!r}; known: {sorted(PRESETS)}") from None
