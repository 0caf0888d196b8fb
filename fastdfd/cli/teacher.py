"""``fastdfd train-teacher``: train the teacher the field distils from, on the user's own data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import torch

from ..version import __version__
from ..data import make_train_dataset
from ..data.loaders import in_input_space
from ..models import create_model
from ..settings import TeacherSettings
from ..settings.cli import add_flags, flags_to_settings
from ..train.teacher import TEACHER_PRESETS, train_teacher
from ..distributed import local_device

__all__ = ["add_teacher_command", "default_eval_spec", "settings_from_args", "train_teacher_command"]

def add_teacher_command(sub: argparse._SubParsersAction) -> None:
    """Add ``train-teacher`` to the ``fastdfd`` subcommands."""
    p = sub.add_parser("train-teacher", help="train a teacher on real data (CIFAR recipe: SGD, cosine, crop+flip)")
    from .commands import INPUT_SPACE_HELP, model_help

    p.add_argument("--model", required=True, help=model_help())
    p.add_argument("--data", required=True, help="training data: digits, cifar10:ROOT, cifar100:ROOT or folder:ROOT")
    p.add_argument("--input-space", default="identity",
                   help=INPUT_SPACE_HELP + "; the training and eval data are fed in it, so pass the same "
                                           "--input-space to train-generators, distill and evaluate")
    p.add_argument("--eval", default=None,
                   help="evaluate every epoch on this spec (default: the test split for cifar, "
                        "the held-out split for digits, none for folders)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p.add_argument("--preset", choices=sorted(TEACHER_PRESETS), default="resnet34_cifar",
                   help="recipe the flags below override (default resnet34_cifar)")
    add_flags(p, TeacherSettings, base={TeacherSettings: TEACHER_PRESETS["resnet34_cifar"]})
    p.add_argument("--no-augment", action="store_true", help="train without crop/flip augmentation")
    p.add_argument("--num-classes", type=int, default=None, help="default: the data's class count")
    p.add_argument("--channels", type=int, default=None, help="image channels (default: the data's)")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: 16 for digits, 32 for cifar, 224 for folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="writes teacher.pt, metrics.csv and summary.json here")
    p.set_defaults(func=train_teacher_command)


def settings_from_args(args: argparse.Namespace) -> TeacherSettings:
    """The preset with every flag the user gave applied (ValueError on a bad value)."""
    if args.preset not in TEACHER_PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; available: {', '.join(sorted(TEACHER_PRESETS))}")
    return flags_to_settings(args, TeacherSettings, TEACHER_PRESETS[args.preset])


def default_eval_spec(data: str) -> str | None:
    """Where a training spec is evaluated by default: the same spec, whose eval loader reads
    the test split (cifar) or the held-out split (digits); folders have no split to pick."""
    scheme = data.strip().partition(":")[0].strip().lower()
    return data if scheme in ("cifar10", "cifar100", "digits") else None


def train_teacher_command(args: argparse.Namespace) -> dict:
    """Everything is checked before the first step; then train and write OUT's three files."""
    from ..pipeline import space_record
    from .commands import eval_loader_in, input_space_arg

    settings = settings_from_args(args)
    space = input_space_arg(getattr(args, "input_space", "identity"), args.channels)
    train_set, data_classes = make_train_dataset(args.data, image_size=args.image_size, augment=not args.no_augment)
    try:
        train_set = in_input_space(train_set, args.data, space)
    except ValueError as e:
        raise ValueError(f"--input-space {space} and --data {args.data}: {e}") from None
    num_classes = args.num_classes if args.num_classes is not None else data_classes
    if num_classes != data_classes:
        raise ValueError(f"--num-classes is {num_classes} but {args.data} has {data_classes} classes")
    data_channels = int(train_set[0][0].shape[0])
    channels = args.channels if args.channels is not None else data_channels
    if channels != data_channels:
        raise ValueError(f"--channels is {channels} but {args.data} has {data_channels}-channel images")

    eval_spec = None if args.no_eval else (args.eval or default_eval_spec(args.data))
    loader = None
    if eval_spec is not None:
        loader, eval_classes = eval_loader_in("--eval", eval_spec, space, image_size=args.image_size,
                                              num_workers=settings.workers)
        if eval_classes != num_classes:
            raise ValueError(f"--eval data {eval_spec} has {eval_classes} classes but the teacher has {num_classes}")

    device = local_device(args.device)
    model = create_model(args.model, num_classes=num_classes, in_channels=channels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = train_teacher(
        model, train_set, settings, eval_loader=loader, device=device, seed=args.seed,
        log_path=out / "metrics.csv", progress=not args.no_progress, checkpoint_path=out / "teacher.pt",
    )
    final = result["history"][-1]
    summary = {
        "model": args.model, "data": args.data, "input_space": space_record(space)["spec"], "eval": eval_spec,
        "num_classes": num_classes,
        "channels": channels, "image_size": int(train_set[0][0].shape[-1]), "augment": not args.no_augment,
        "preset": args.preset, "settings": dataclasses.asdict(settings), "seed": args.seed, "device": str(device),
        "accuracy": result["accuracy"], "train_loss": final["train_loss"], "train_acc": final["train_acc"],
        "seconds": sum(row["seconds"] for row in result["history"]), "weights": str(out / "teacher.pt"),
        "versions": {"fastdfd": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("model", "data", "input_space", "accuracy", "train_acc", "weights")}))
    return summary
