"""The recipe file's keys: every hyperparameter of a run, with its type and allowed values.

A recipe names every value the run uses; nothing has a default here, so what is not in the
file is an error, not a silent choice made in code. The only optional part is the
``[teacher_training]`` table, needed exactly when ``teacher.weights`` is empty (train the
teacher first) and refused otherwise (a table that would be ignored is a mistake).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..nn.matcher import NORMALIZATIONS
from ..ops import KINDS

DATASETS = ("digits", "cifar10", "cifar100", "folder", "cifar10-jpeg-heldout", "cifar10-jpeg-tune")
SCOPES = ("generator", "ensemble")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Field:
    kind: str  # int, float, bool, str, ints (list of int), chunk (int | "all" | "auto")
    doc: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None


def _pos(doc: str) -> Field:
    return Field("int", doc, minimum=1)


def _nonneg(doc: str) -> Field:
    return Field("float", doc, minimum=0)


TOP = {
    "name": Field("str", "short name; the default run directory is runs/<name>"),
    "description": Field("str", "one line: teacher -> student on which data"),
    "paper": Field("str", "the published figure this recipe reproduces, and where it is printed"),
    "seed": Field("int", "seeds every stage: the teacher uses seed, the generators seed + 1, distillation seed + 2"),
}

SECTIONS: dict[str, dict[str, Field]] = {
    "data": {
        "dataset": Field("str", "what the teacher was trained on; cifar10-jpeg-*: the CIFAR-10 test set as JPEG "
                                "(root holds test.tar), evaluation only, for a teacher given by its weights",
                         choices=DATASETS),
        "root": Field("str", "cifar: the folder holding torchvision's cifar-10-batches-py/ or cifar-100-python/; "
                             "cifar10-jpeg-*: the folder holding test.tar; folder: holds train/ and val/; "
                             "digits: empty"),
        "num_classes": _pos("classes of the teacher; checked against the data"),
        "channels": _pos("image channels"),
        "image_size": _pos("generated (and evaluated) image side in pixels"),
    },
    "teacher": {
        "model": Field("str", "the teacher's architecture: a fastdfd registry name, or timm:NAME / torchvision:NAME "
                              "(random weights, never downloaded)"),
        "weights": Field("str", "state_dict file of a trained teacher (fastdfd, torchvision or timm layouts); empty: "
                                "train it ([teacher_training])"),
        "input_space": Field("str", "the normalisation the teacher was trained with: images are pixels in [0, 1] "
                                    "and the teacher sees (pixels - mean) / std; a preset (identity, minus_one_one, "
                                    "imagenet, cifar10, cifar100) or 'mean=a,b,c;std=d,e,f'. The generators' "
                                    "images, the evaluation data and, when the recipe trains the teacher, its "
                                    "training data are all fed in it"),
    },
    "teacher_training": {
        "epochs": _pos("epochs over the training split"),
        "batch_size": _pos("images per SGD step"),
        "lr": Field("float", "peak learning rate (cosine annealed to 0 per iteration)", minimum=0),
        "momentum": _nonneg("SGD momentum"),
        "nesterov": Field("bool", "Nesterov momentum"),
        "weight_decay": _nonneg("L2 weight decay"),
        "warmup_epochs": Field("int", "linear warm-up epochs before the cosine", minimum=0),
        "label_smoothing": _nonneg("cross-entropy label smoothing"),
        "augment": Field("bool", "the dataset's standard augmentation (CIFAR: pad-4 crop + flip)"),
        "workers": Field("int", "data-loading processes", minimum=0),
    },
    "generators": {
        "num_generators": _pos("ensemble size K (the classes are split evenly among them)"),
        "latent_dim": _pos("z dimension"),
        "widths": Field("ints", "channels of the first layer's output and of each upsampling conv"),
        "output_bn": Field("bool", "the paper's final scale-only BN after tanh"),
        "updates_per_generator": _pos("Adam steps each generator takes; the run's step count follows from the "
                                      "ensemble (per process) and generators_per_step, so it does not depend on "
                                      "the number of processes"),
        "batch_size": _pos("images per generator per step"),
        "generators_per_step": Field("chunk", "generators per step in each process (what one device holds): an "
                                              "integer, 'all', or 'auto' (the largest chunk the memory planner fits)"),
        "lr": Field("float", "Adam learning rate (one Adam per generator)", minimum=0),
        "beta1": _nonneg("Adam beta1"),
        "beta2": _nonneg("Adam beta2"),
        "kind": Field("str", "moment distance", choices=tuple(KINDS)),
        "scope": Field("str", "statistics per generator, or over the whole (global) batch", choices=SCOPES),
        "normalization": Field("str", "sum: each BN layer's distance summed over its channels, layers summed (the "
                                      "paper's; grows with the teacher's width and depth); mean: averaged over "
                                      "channels and layers (docs/generators.md)", choices=NORMALIZATIONS),
        "moment_weight": _nonneg("weight of the BN moment loss"),
        "ce_weight": _nonneg("weight of the teacher's cross-entropy against the label"),
        "tv_weight": _nonneg("weight of the total-variation image prior"),
        "first_layer_multiplier": _nonneg("extra weight on the first BN layer's moment loss"),
        "bf16": Field("bool", "bf16 autocast and a channels_last teacher (GPUs)"),
        "offload": Field("bool", "generators and Adam states in pinned host memory, streamed per chunk"),
        "cuda_graph": Field("str", "capture the fixed-shape step in a CUDA graph: on (required), auto (when the "
                                   "run allows it, else eager and the log says why), off", choices=("off", "auto", "on")),
        "checkpoint_every": Field("int", "steps between checkpoints (0: none)", minimum=0),
        "sample_every": Field("int", "steps between sample grids (0: none)", minimum=0),
    },
    "student": {
        "model": Field("str", "the student's architecture: a fastdfd registry name, or timm:NAME / "
                              "torchvision:NAME"),
    },
    "distill": {
        "steps": _pos("student optimizer steps"),
        "batch_size": _pos("images per generator per step"),
        "generators_per_step": Field("chunk", "generators sampled per step over all processes (split evenly "
                                              "among them, so the global batch does not depend on their number): "
                                              "an integer or 'all'"),
        "optimizer": Field("str", "student optimizer", choices=OPTIMIZERS),
        "lr": Field("float", "peak learning rate, cosine annealed to 0 over the steps", minimum=0),
        "momentum": _nonneg("SGD momentum (Nesterov)"),
        "weight_decay": _nonneg("L2 weight decay"),
        "temperature": Field("float", "softening of both distributions (loss x tau^2)", minimum=0),
        "checkpoint_every": Field("int", "steps between checkpoints (0: none)", minimum=0),
    },
}

OPTIONAL_SECTIONS = frozenset({"teacher_training"})


def _type_ok(field: Field, value: Any) -> bool:
    if field.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if field.kind == "float":  # TOML writes 1 for 1.0 as often as not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if field.kind == "bool":
        return isinstance(value, bool)
    if field.kind == "str":
        return isinstance(value, str)
    if field.kind == "ints":
        return isinstance(value, list) and bool(value) and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if field.kind == "chunk":
        return value in ("all", "auto") or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
    raise AssertionError(field.kind)


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "ints": "a non-empty list of positive integers", "chunk": "a positive integer, 'all' or 'auto'"}


def check_value(key: str, field: Field, value: Any) -> Any:
    """Return the value (floats as float) or raise ValueError naming the key and what it expects."""
    if not _type_ok(field, value):
        raise ValueError(f"recipe key {key} = {value!r}: expected {_EXPECTED[field.kind]} ({field.doc})")
    if field.choices is not None and value not in field.choices:
        raise ValueError(f"recipe key {key} = {value!r}: expected one of {', '.join(field.choices)}")
    if field.minimum is not None and value < field.minimum:
        raise ValueError(f"recipe key {key} = {value!r}: must be >= {field.minimum:g}")
    return float(value) if field.kind == "float" else value
