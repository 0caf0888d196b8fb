"""GeneratorEnsemble: K generators of identical architecture, run in one batched pass.

Every parameter is stacked on a leading K axis. One forward for all K:

- first layer: ``bmm(z, W_z)`` plus a row gather of ``W_y`` for the label part (the
  one-hot matmul over the class columns is a gather);
- BN in train mode per (generator, channel) = one BN over K*C channels of a batch-major
  [B, K*C, H, W] tensor (generator k owns channels k*C .. k*C+C-1);
- each 3x3 conv = one grouped convolution with groups = K (the ``torch`` backend), or one
  Triton implicit-GEMM kernel with the BN/LeakyReLU/upsample chain fused (``triton``).

The result equals K standalone :class:`fastdfd.models.Generator` forwards, outputs and
gradients (BN statistics are per generator either way). The batched pass is
:func:`fastdfd.ops.generator.ensemble_forward`, chosen by backend dispatch.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..checkpoint import CheckpointError, atomic_save, load_file
from ..models.generator import Generator, GeneratorSpec, uniform_fan_in_
from ..ops.generator import ensemble_forward
from ..settings import ArchitectureSettings

_ARCHITECTURE = ArchitectureSettings()  # the defaults (the library's, output BN off; the paper's: preset("paper"))


def default_classes(num_generators: int, num_classes: int) -> list[list[int]]:
    """One class each when K == classes, all classes when K == 1, else an even contiguous split."""
    if num_generators == num_classes:
        return [[c] for c in range(num_classes)]
    if num_generators == 1:
        return [list(range(num_classes))]
    if num_classes % num_generators == 0:
        per = num_classes // num_generators
        return [list(range(k * per, (k + 1) * per)) for k in range(num_generators)]
    raise ValueError(
        f"cannot split {num_classes} classes evenly over {num_generators} generators; pass classes= explicitly"
    )


class GeneratorEnsemble(nn.Module):
    """K class-conditional generators with stacked parameters.

    Args:
        num_generators: K.
        num_classes: classes of the teacher.
        image_size, channels, latent_dim, widths, output_bn: the architecture
            (see :class:`fastdfd.models.generator.GeneratorSpec`); defaults those of
            :class:`fastdfd.settings.ArchitectureSettings`. ``output_bn`` (default off) is the
            paper's final scale-only BN, which cost 22 points in the project's ablation.
        classes: the class set of each generator (K sequences of equal length). Default:
            one class per generator when K == num_classes, every class when K == 1.
    """

    def __init__(
        self,
        num_generators: int,
        num_classes: int,
        *,
        image_size: int = 32,
        channels: int = 3,
        latent_dim: int = _ARCHITECTURE.latent_dim,
        widths: Sequence[int] = _ARCHITECTURE.widths,
        output_bn: bool = _ARCHITECTURE.output_bn,
        classes: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__()
        if num_generators < 1 or num_classes < 1:
            raise ValueError("num_generators and num_classes must be positive")
        self.spec = GeneratorSpec(image_size, channels, latent_dim, tuple(widths), output_bn)
        self.num_generators = int(num_generators)
        self.num_classes = int(num_classes)
        sets = default_classes(num_generators, num_classes) if classes is None else [list(map(int, c)) for c in classes]
        self._check_classes(sets)
        self.classes = [tuple(c) for c in sets]
        table = torch.full((num_generators, num_classes), -1, dtype=torch.long)
        for k, cs in enumerate(sets):
            table[k, cs] = torch.arange(len(cs))
        self.register_buffer("class_table", table, persistent=False)  # [K, classes] -> local index or -1
        self.register_buffer("class_ids", torch.tensor(sets, dtype=torch.long), persistent=False)  # [K, n]
        for name, shape in self.param_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    # ------------------------------------------------------------------ set-up
    def _check_classes(self, sets: list[list[int]]) -> None:
        if len(sets) != self.num_generators:
            raise ValueError(f"classes has {len(sets)} sets for {self.num_generators} generators")
        sizes = {len(c) for c in sets}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"every generator needs the same, non-zero number of classes; got sizes {sorted(sizes)}")
        for k, cs in enumerate(sets):
            if len(set(cs)) != len(cs) or min(cs) < 0 or max(cs) >= self.num_classes:
                raise ValueError(f"classes[{k}] = {cs} must be distinct ids in [0, {self.num_classes})")

    @property
    def classes_per_generator(self) -> int:
        return len(self.classes[0])

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        s, k = self.spec, self.num_generators
        shapes = {
            "fc_z": (k, s.latent_dim, s.fc_features),
            "fc_y": (k, self.classes_per_generator, s.fc_features),
            "bn0_weight": (k, s.widths[0]),
            "bn0_bias": (k, s.widths[0]),
        }
        for i, (out_c, in_c) in enumerate(s.conv_shapes()[:-1]):
            shapes[f"conv{i}_weight"] = (k, out_c, in_c, 3, 3)
            shapes[f"bn{i + 1}_weight"] = (k, out_c)
            shapes[f"bn{i + 1}_bias"] = (k, out_c)
        shapes["out_weight"] = (k, s.channels, s.widths[-1], 3, 3)
        shapes["out_bias"] = (k, s.channels)
        if s.output_bn:
            shapes["out_scale"] = (k, s.channels)
        return shapes

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The distribution of K freshly built standalone generators (PyTorch default inits)."""
        fc_fan_in = self.spec.latent_dim + self.classes_per_generator
        for name, p in self.named_parameters():
            if name in ("fc_z", "fc_y"):
                uniform_fan_in_(p, fc_fan_in, generator)
            elif name.startswith("conv") or name == "out_weight":
                uniform_fan_in_(p, p.shape[2] * 9, generator)
            elif name == "out_bias":
                uniform_fan_in_(p, self.spec.widths[-1] * 9, generator)
            elif name.startswith("bn") and name.endswith("_bias"):
                nn.init.zeros_(p)
            else:  # BN weights and the output scale
                nn.init.ones_(p)

    def config(self) -> dict:
        """Everything that fixes the parameter layout (compared when loading checkpoints)."""
        return {
            "num_generators": self.num_generators,
            "num_classes": self.num_classes,
            "classes": [list(c) for c in self.classes],
            **self.spec.to_dict(),
        }

    @classmethod
    def from_config(cls, config: Mapping) -> "GeneratorEnsemble":
        c = dict(config)
        return cls(
            c.pop("num_generators"), c.pop("num_classes"), classes=c.pop("classes"),
            image_size=c["image_size"], channels=c["channels"], latent_dim=c["latent_dim"],
            widths=c["widths"], output_bn=c["output_bn"],
        )

    # ---------------------------------------------------------------- forward
    def stacked(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Parameters of all generators (views) or of the generators in ``rows`` (copies)."""
        if rows is None:
            return dict(self.named_parameters())
        return {name: p.index_select(0, rows) for name, p in self.named_parameters()}

    def _rows(self, generators) -> torch.Tensor | None:
        """Generator indices as a device tensor; a Python sequence is checked without a device sync."""
        if generators is None:
            return None
        if isinstance(generators, torch.Tensor):
            rows = generators.to(self.class_table.device, torch.long).reshape(-1)
            lo, hi = (int(rows.min()), int(rows.max())) if rows.numel() else (0, -1)
        else:
            idx = [int(g) for g in generators]
            lo, hi = (min(idx), max(idx)) if idx else (0, -1)
            rows = torch.tensor(idx, dtype=torch.long, device=self.class_table.device)
        if rows.numel() == 0 or lo < 0 or hi >= self.num_generators:
            raise ValueError(f"generator indices must lie in [0, {self.num_generators})")
        return rows

    def local_labels(self, y: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Map global labels [k, B] to positions in each generator's class set (validated)."""
        if y.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"labels must be an integer tensor, got {y.dtype}")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range [{int(y.min())}, {int(y.max())}]")
        table = self.class_table if rows is None else self.class_table.index_select(0, rows)
        local = table.gather(1, y.long())
        if bool((local < 0).any()):
            k = int((local < 0).any(1).nonzero()[0])
            gen = k if rows is None else int(rows[k])
            raise ValueError(
                f"labels {sorted(set(y[k][local[k] < 0].tolist()))} are outside generator {gen}'s classes "
                f"{list(self.classes[gen])}"
            )
        return local

    def forward(self, z: torch.Tensor, y: torch.Tensor, generators=None) -> torch.Tensor:
        """z [k, B, latent] and global labels y [k, B] -> images [k, B, C, S, S].

        k is K, or the number of indices in ``generators`` (a subset, in that order).
        """
        rows = self._rows(generators)
        k = self.num_generators if rows is None else rows.numel()
        if z.dim() != 3 or z.shape[0] != k or z.shape[2] != self.spec.latent_dim or z.shape[1] == 0:
            raise ValueError(f"z must be [{k}, B, {self.spec.latent_dim}] with B > 0, got {tuple(z.shape)}")
        if tuple(y.shape) != tuple(z.shape[:2]):
            raise ValueError(f"y must be [{k}, {z.shape[1]}] (one label per latent), got {tuple(y.shape)}")
        return ensemble_forward(self.stacked(rows), self.spec, z, self.local_labels(y, rows))

    def draw(self, n: int, rows: torch.Tensor | None, rng: torch.Generator | None = None):
        """Latents [k, n, latent], global labels [k, n] and local positions [k, n] for k generators."""
        k = self.num_generators if rows is None else rows.numel()
        dev = self.class_ids.device
        z = torch.randn(k, n, self.spec.latent_dim, generator=rng, device=dev)
        local = torch.randint(0, self.classes_per_generator, (k, n), generator=rng, device=dev)
        ids = self.class_ids if rows is None else self.class_ids.index_select(0, rows)
        return z, ids.gather(1, local), local

    @torch.no_grad()
    def sample(self, n: int, generators=None, *, rng: torch.Generator | None = None):
        """Draw ``n`` images from each generator (all, or those in ``generators``).

        Returns (images [k*n, C, S, S], labels [k*n]), generator-major.
        """
        if n < 1:
            raise ValueError("n must be positive")
        rows = self._rows(generators)
        z, y, local = self.draw(n, rows, rng)
        x = ensemble_forward(self.stacked(rows), self.spec, z.to(self.fc_z.dtype), local)
        return x.reshape(-1, *x.shape[2:]), y.reshape(-1)

    # ------------------------------------------------------- standalone modules
    def unbind(self) -> list[Generator]:
        """K standalone generators holding copies of this ensemble's parameters."""
        out = []
        n_lat = self.spec.latent_dim
        for k in range(self.num_generators):
            g = Generator(self.classes[k], self.spec).to(self.fc_z.device, self.fc_z.dtype)
            with torch.no_grad():
                g.fc.weight.copy_(torch.cat([self.fc_z[k], self.fc_y[k]], 0).t())
                g.bn0.weight.copy_(self.bn0_weight[k])
                g.bn0.bias.copy_(self.bn0_bias[k])
                for i, (conv, bn) in enumerate(zip(g.convs, g.bns)):
                    conv.weight.copy_(getattr(self, f"conv{i}_weight")[k])
                    bn.weight.copy_(getattr(self, f"bn{i + 1}_weight")[k])
                    bn.bias.copy_(getattr(self, f"bn{i + 1}_bias")[k])
                g.out.weight.copy_(self.out_weight[k])
                g.out.bias.copy_(self.out_bias[k])
                if g.out_scale is not None:
                    g.out_scale.copy_(self.out_scale[k])
            assert g.fc.weight.shape[1] == n_lat + self.classes_per_generator
            out.append(g)
        return out

    @classmethod
    def stack(cls, generators: Sequence[Generator], num_classes: int | None = None) -> "GeneratorEnsemble":
        """One ensemble from standalone generators of the same architecture."""
        if not generators:
            raise ValueError("need at least one generator")
        spec = generators[0].spec
        if any(g.spec != spec for g in generators):
            raise ValueError("all generators must share one architecture (GeneratorSpec)")
        n_cls = num_classes if num_classes is not None else 1 + max(max(g.classes) for g in generators)
        ens = cls(
            len(generators), n_cls, classes=[g.classes for g in generators], image_size=spec.image_size,
            channels=spec.channels, latent_dim=spec.latent_dim, widths=spec.widths, output_bn=spec.output_bn,
        ).to(generators[0].fc.weight.device, generators[0].fc.weight.dtype)
        n_lat = spec.latent_dim
        with torch.no_grad():
            fc = torch.stack([g.fc.weight.t() for g in generators])  # [K, latent + n, D]
            ens.fc_z.copy_(fc[:, :n_lat])
            ens.fc_y.copy_(fc[:, n_lat:])
            ens.bn0_weight.copy_(torch.stack([g.bn0.weight for g in generators]))
            ens.bn0_bias.copy_(torch.stack([g.bn0.bias for g in generators]))
            for i in range(len(spec.widths)):
                getattr(ens, f"conv{i}_weight").copy_(torch.stack([g.convs[i].weight for g in generators]))
                getattr(ens, f"bn{i + 1}_weight").copy_(torch.stack([g.bns[i].weight for g in generators]))
                getattr(ens, f"bn{i + 1}_bias").copy_(torch.stack([g.bns[i].bias for g in generators]))
            ens.out_weight.copy_(torch.stack([g.out.weight for g in generators]))
            ens.out_bias.copy_(torch.stack([g.out.bias for g in generators]))
            if spec.output_bn:
                ens.out_scale.copy_(torch.stack([g.out_scale for g in generators]))
        return ens

    def shard(self, lo: int, hi: int) -> "GeneratorEnsemble":
        """A new ensemble of generators [lo, hi) of this one (copies: a rank's part of the run)."""
        if not 0 <= lo < hi <= self.num_generators:
            raise ValueError(f"shard [{lo}, {hi}) is outside [0, {self.num_generators})")
        s = self.spec
        part = type(self)(
            hi - lo, self.num_classes, classes=self.classes[lo:hi], image_size=s.image_size, channels=s.channels,
            latent_dim=s.latent_dim, widths=s.widths, output_bn=s.output_bn,
        ).to(self.fc_z.device, self.fc_z.dtype)
        with torch.no_grad():
            for name, p in part.named_parameters():
                p.copy_(getattr(self, name)[lo:hi])
        return part

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"K={self.num_generators}, classes={self.num_classes} ({self.classes_per_generator} per generator), "
            f"image={s.channels}x{s.image_size}x{s.image_size}, latent={s.latent_dim}, widths={s.widths}, "
            f"output_bn={s.output_bn}"
        )


ENSEMBLE_FORMAT = "fastdfd.generator_ensemble"


def save_ensemble(ensemble: GeneratorEnsemble, path) -> None:
    """Write the ensemble (configuration + parameters) atomically, loadable without code changes."""
    atomic_save({"format": ENSEMBLE_FORMAT, "version": 1, "config": ensemble.config(),
                 "state": {k: v.detach().cpu() for k, v in ensemble.state_dict().items()}}, path)


def load_ensemble(path, map_location: str | torch.device = "cpu") -> GeneratorEnsemble:
    """Rebuild an ensemble written by :func:`save_ensemble` (or a GeneratorTrainer checkpoint)."""
    try:
        state = load_file(path, ENSEMBLE_FORMAT)
        config, params = state["config"], state["state"]
    except CheckpointError:
        state = load_file(path, "fastdfd.generator_trainer")
        config, params = state["ensemble_config"], state["ensemble"]
    ensemble = GeneratorEnsemble.from_config(config)
    ensemble.load_state_dict(params)
    return ensemble.to(map_location)
