"""The recipe file's keys: every hyperparameter of a run, with its type and allowed values.

The ``[generators]`` and ``[distill]`` tables are made from the settings classes (:mod:`fastdfd.settings`):
each of their fields with ``recipe=True`` is a key, checked by the field's own spec, so a setting added there
is a recipe key with no edit here. A recipe names every value the run uses: a key is optional only where its
field declares the value its absence means (``absent``, the value of runs from before the field existed);
anything else not in the file is an error, not a silent choice made in code. The optional tables are
``[teacher_training]``, needed exactly when the teacher is trained first (``teacher.weights`` empty and no
published weights: ``teacher.pretrained``, ``teacher.weights_enum`` or ``torchvision:NAME:WEIGHTS``) and
refused otherwise (a table that would be ignored is a mistake), and ``[turns]``: with it the generators keep
training in rounds with the student, which learns from a pool of their images (:class:`fastdfd.settings.TurnsSettings`);
without it they train first, then the student learns from them frozen.
"""

from __future__ import annotations

from typing import Any

from ..settings import DISTILL_STAGE, GENERATOR_STAGE, REQUIRED, Settings, Spec, TeacherSettings, TurnsSettings

DATASETS = ("digits", "cifar10", "cifar100", "folder", "cifar10-jpeg-heldout", "cifar10-jpeg-tune")



def Field(kind: str, doc: str, choices=None, minimum=None,  # noqa: N802 (reads as the spec it makes)
          absent=REQUIRED) -> Spec:
    """A key of the recipe's own (not a setting of a trainer): the data, the models, the run's length."""
    return Spec(name="", kind=kind, doc=doc, choices=None if choices is None else tuple(choices), minimum=minimum,
                absent=absent)


def _pos(doc: str) -> Spec:
    return Field("int", doc, minimum=1)


def _nonneg(doc: str) -> Spec:
    return Field("float", doc, minimum=0)


def settings_keys(*classes: type[Settings], skip: tuple[str, ...] = ()) -> dict[str, Spec]:
    """Every recipe field of ``classes`` as a key (but ``skip``)."""
    return {s.name: s for cls in classes for s in cls.specs() if s.recipe and s.name not in skip}


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
        "model": Field("str", "the teacher's architecture: a fastdfd registry name, or timm:NAME / "
                              "torchvision:NAME[:WEIGHTS] (WEIGHTS: a member of torchvision's weights enum, e.g. "
                              "IMAGENET1K_V2 or DEFAULT, loaded through torch.hub's cache)"),
        "weights": Field("str", "state_dict file of a trained teacher (fastdfd, torchvision or timm layouts); empty: "
                                "the zoo's published weights (pretrained, weights_enum) or train it "
                                "([teacher_training])"),
        "pretrained": Field("bool", "a zoo teacher's published weights, through the zoo's own loader: timm:NAME[.TAG] "
                                    "from timm's Hugging Face cache (HF_HOME / HF_HUB_CACHE; downloaded where there is "
                                    "a network; a head of another class count is dropped), torchvision:NAME its "
                                    "DEFAULT weights; needs weights = \"\"", absent=False),
        "weights_enum": Field("str", "a torchvision teacher's weights enum member (IMAGENET1K_V2, DEFAULT), from "
                                     "$TORCH_HOME/hub/checkpoints or downloaded; needs weights = \"\"; empty: none",
                              absent=""),
        "input_space": Field("str", "the normalisation the teacher was trained with: images are pixels in [0, 1] "
                                    "and the teacher sees (pixels - mean) / std; a preset (identity, minus_one_one, "
                                    "imagenet, cifar10, cifar100) or 'mean=a,b,c;std=d,e,f'. The generators' "
                                    "images, the evaluation data and, when the recipe trains the teacher, its "
                                    "training data are all fed in it"),
    },
    "teacher_training": {
        **settings_keys(TeacherSettings),
        "augment": Field("bool", "the dataset's standard augmentation (CIFAR: pad-4 crop + flip)"),
    },
    "generators": {
        "num_generators": _pos("ensemble size K (the classes are split evenly among them)"),
        "updates_per_generator": _pos("Adam steps each generator takes before the student starts (with [turns] "
                                      "their warm-up: they go on in turns with the student); the run's step count "
                                      "follows from the ensemble (per process) and generators_per_step, so it does "
                                      "not depend on the number of processes"),
        **settings_keys(*GENERATOR_STAGE),
    },
    "student": {
        "model": Field("str", "the student's architecture: a fastdfd registry name, or timm:NAME / "
                              "torchvision:NAME"),
    },
    "distill": {
        "steps": _pos("student optimizer steps"),
        # the chunk is global here: the runner splits it among the processes
        **settings_keys(*DISTILL_STAGE, skip=("sample_every",)),
    },
    # optional: the generators go on training in rounds with the student, which draws from a pool of their images
    "turns": settings_keys(TurnsSettings),
}

OPTIONAL_SECTIONS = frozenset({"teacher_training", "turns"})


def is_required(spec: Spec) -> bool:
    """Whether a recipe must name this key (no ``absent`` value declared)."""
    return spec.absent is REQUIRED


def check_value(key: str, field: Spec, value: Any) -> Any:
    """The value normalised by its spec (floats as float, lists as tuples, 'all' as None), or ValueError
    naming the recipe key and what it expects."""
    return field.check(value, f"recipe key {key}")

