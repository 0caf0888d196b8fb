"""``fastdfd train-generators``, ``distill``, ``evaluate`` and ``models`` for a user's own teacher."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from .. import pipeline
from ..data import make_eval_loader
from ..distributed import init_from_env, local_device
from ..input_space import PRESETS, InputSpace
from ..models import create_model, list_models
from ..models.weights import load_weights
from ..models.zoo import ZOOS, is_zoo_spec, list_zoo_models, zoo_status
from ..nn import GeneratorEnsemble, load_ensemble
from ..settings import (DISTILL_STAGE, GENERATOR_STAGE, ArchitectureSettings, DistillSettings,
                        ExecutionSettings, LoopSettings, LossSettings, OptimizerSettings, preset)
from ..settings.presets import PRESETS as GENERATOR_PRESETS
from ..settings.cli import add_flags, flags_to_settings
from ..train import evaluate_accuracy

INPUT_SPACE_HELP = (f"the teacher's input normalisation: images are pixels in [0, 1] and the teacher sees "
                    f"(pixels - mean) / std; a preset ({', '.join(PRESETS)}; '[-1,1]' = minus_one_one) or "
                    f"'mean=a,b,c;std=d,e,f' (default identity: the teacher sees pixels)")
WEIGHTS_HELP = ("state_dict file (fastdfd, torchvision or timm layouts: plain, or under state_dict / model / "
                "state_dict_ema; .safetensors with the safetensors package)")


def model_help(what: str = "architecture") -> str:
    return (f"the {what}: a fastdfd registry name ({', '.join(list_models())}), or timm:NAME / torchvision:NAME "
            "(random weights, or the zoo's published ones with --pretrained / --weights-enum; see fastdfd models)")


def add_pretrained_flags(p: argparse.ArgumentParser, whose: str, weights_flag: str) -> None:
    """--pretrained, --pretrained-file, --weights-enum: a zoo model's published weights instead of ``weights_flag``."""
    p.add_argument("--pretrained", action="store_true",
                   help=f"the {whose} published weights instead of {weights_flag}: timm:NAME[.TAG] through timm's "
                        "loader (its Hugging Face cache, HF_HOME / HF_HUB_CACHE; downloaded where there is a network), "
                        "torchvision:NAME its DEFAULT weights enum")
    p.add_argument("--pretrained-file", default=None, metavar="FILE",
                   help=f"timm: the {whose} pretrained weights from this local file, through timm's loader "
                        "(pretrained_cfg_overlay=dict(file=FILE): a head of another class count is dropped)")
    p.add_argument("--weights-enum", default=None, metavar="NAME",
                   help=f"torchvision: the {whose} weights enum member (IMAGENET1K_V2, DEFAULT; or "
                        "torchvision:NAME:WEIGHTS), read from $TORCH_HOME/hub/checkpoints or downloaded")


def pretrained_kwargs(args: argparse.Namespace, name: str, weights: str | None, weights_flag: str) -> dict:
    """create_model's pretrained/pretrained_file/weights from the flags; ValueError when the model has no
    source of weights, or two (``weights_flag`` and a pretrained flag)."""
    given = {"--pretrained": args.pretrained, "--pretrained-file": args.pretrained_file,
             "--weights-enum": args.weights_enum}
    given = [flag for flag, value in given.items() if value]
    in_spec = is_zoo_spec(name) and name.count(":") == 2  # torchvision:NAME:WEIGHTS
    if weights and (given or in_spec):
        raise ValueError(f"{weights_flag} {weights} and {given[0] if given else name}: give one source of the "
                         f"weights (a trained state_dict file, or the zoo's published weights)")
    if not weights and not given and not in_spec:
        raise ValueError(f"{name}: no weights; give {weights_flag} FILE (a trained state_dict), or for a zoo model "
                         "--pretrained, --pretrained-file FILE (timm) or --weights-enum NAME (torchvision)")
    if given and not is_zoo_spec(name):
        raise ValueError(f"{given[0]} takes a zoo model (timm:NAME or torchvision:NAME), not {name!r}; "
                         f"fastdfd's own models load {weights_flag} FILE")
    return {"pretrained": bool(args.pretrained), "pretrained_file": args.pretrained_file, "weights": args.weights_enum}


def _loaded(args: argparse.Namespace, name: str, num_classes: int, in_channels: int, weights: str | None,
            weights_flag: str, what: str) -> nn.Module:
    """The model with its weights: from the ``weights_flag`` file, or the zoo's published ones."""
    kwargs = pretrained_kwargs(args, name, weights, weights_flag)
    if weights:
        return load_weights(_model(name, num_classes, in_channels), weights, what)
    return create_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    return create_model(name, num_classes=num_classes, in_channels=in_channels)


def input_space_arg(spec: str | None, channels: int | None, images: str = "the images (--channels)",
                    flag: str = "--input-space") -> InputSpace:
    """The parsed space, or a ValueError naming the flag (an unknown preset, bad values, or
    per-channel values that do not fit ``channels``)."""
    try:
        space = InputSpace.parse(spec)
        if channels is not None:
            space.check_channels(channels, images)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{flag} {spec!r}: {e}") from None
    return space


def eval_loader_in(flag: str, spec: str, space: InputSpace, **kwargs):
    """make_eval_loader in ``space``; a space that does not fit the data names both flags."""
    try:
        return make_eval_loader(spec, input_space=space, **kwargs)
    except ValueError as e:
        if "input space" not in str(e):
            raise
        raise ValueError(f"--input-space {space} and {flag} {spec}: {e}") from None


def _check_generators_space(generators: str | Path, space: InputSpace) -> None:
    """Refuse distilling in another input space than the one the generators were trained against
    (train-generators records it in summary.json beside generators.pt)."""
    summary = Path(generators).parent / "summary.json"
    try:
        recorded = json.loads(summary.read_text()).get("input_space") if summary.is_file() else None
    except (OSError, ValueError):
        return
    if not isinstance(recorded, dict) or "mean" not in recorded or "std" not in recorded:
        return
    if (tuple(recorded["mean"]), tuple(recorded["std"])) != (space.mean, space.std):
        raise ValueError(f"--input-space {space}: the generators in {generators} were trained against a teacher "
                         f"in input space {recorded.get('name')} (mean {recorded['mean']}, std {recorded['std']}; "
                         f"{summary}); pass --input-space {recorded.get('spec', recorded.get('name'))}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-generators", help="train a generator ensemble from a teacher alone")
    p.add_argument("--teacher", required=True, help=model_help("teacher's architecture"))
    p.add_argument("--weights", default=None, help=f"the teacher's {WEIGHTS_HELP}")
    add_pretrained_flags(p, "teacher's", "--weights")
    p.add_argument("--input-space", default="identity", help=INPUT_SPACE_HELP)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--channels", type=int, default=3, help="image channels")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--generators", type=int, default=None, help="ensemble size K (default: one per class)")
    p.add_argument("--preset", choices=sorted(GENERATOR_PRESETS), default="default",
                   help="the generator settings the flags below start from (fastdfd.settings.presets; "
                        "docs/generators.md): default, the scale-free loss; paper, Luo et al.'s; the defaults shown "
                        "are the default preset's")
    p.add_argument("--steps", type=_positive_int, default=2000)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run's files in OUT first")
    add_flags(p, *GENERATOR_STAGE)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=train_generators)

    p = sub.add_parser("distill", help="distill a student from a teacher and a generator ensemble")
    p.add_argument("--teacher", required=True, help=model_help("teacher's architecture"))
    p.add_argument("--teacher-weights", default=None, help=f"the teacher's {WEIGHTS_HELP}")
    add_pretrained_flags(p, "teacher's", "--teacher-weights")
    p.add_argument("--student", required=True, help=model_help("student's architecture"))
    p.add_argument("--input-space", default="identity",
                   help=INPUT_SPACE_HELP + "; the same as train-generators was given (checked against its "
                                           "summary.json), and the --eval data are fed in it")
    p.add_argument("--generators", required=True, help="generators.pt written by train-generators")
    p.add_argument("--steps", type=_positive_int, default=2000)
    add_flags(p, *DISTILL_STAGE, skip=("sample_every",))
    p.add_argument("--eval", default=None,
                   help="evaluate on: digits, cifar10:ROOT, cifar100:ROOT, folder:ROOT (in --input-space)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run's files in OUT first")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=distill)

    p = sub.add_parser("evaluate", help="top-1 accuracy of a model on real data")
    p.add_argument("--model", required=True, help=model_help())
    p.add_argument("--weights", default=None, help=f"the model's {WEIGHTS_HELP}")
    add_pretrained_flags(p, "model's", "--weights")
    p.add_argument("--input-space", default="identity",
                   help=INPUT_SPACE_HELP + "; the data are fed in it (the space the model was trained or distilled in)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the data's class count")
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--data", required=True, help="digits, cifar10:ROOT, cifar100:ROOT or folder:ROOT")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the data to this side (default: the data's own: 16 digits, 32 cifar, 224 folders)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.set_defaults(func=evaluate)

    p = sub.add_parser("models", help="the architectures --teacher/--student/--model take: fastdfd's registry "
                                      "and the zoos (timm:NAME, torchvision:NAME)")
    p.add_argument("--zoo", choices=ZOOS, default=None, help="list this zoo's architectures instead")
    p.add_argument("pattern", nargs="?", default="", help="only names containing this text")
    p.set_defaults(func=models)


def generator_settings_from_flags(args: argparse.Namespace) -> dict:
    """The --preset's settings with every flag the user gave laid over them, one object per concern."""
    base = preset(args.preset)
    return {
        "architecture": flags_to_settings(args, ArchitectureSettings, base.architecture),
        "loss": flags_to_settings(args, LossSettings, base.loss),
        "optim": flags_to_settings(args, OptimizerSettings, base.optimizer),
        "execution": flags_to_settings(args, ExecutionSettings),
        "loop": flags_to_settings(args, LoopSettings),
    }


def train_generators(args: argparse.Namespace) -> dict:
    """Under torchrun each process trains its shard of the ensemble; rank 0 writes generators.pt."""
    space = input_space_arg(args.input_space, args.channels)
    device = local_device(args.device)
    ctx = init_from_env(device)
    teacher = _loaded(args, args.teacher, args.num_classes, args.channels, args.weights, "--weights", "teacher")
    s = generator_settings_from_flags(args)
    arch = s.pop("architecture")
    torch.manual_seed(s["loop"].seed)  # every process builds the same initial ensemble, then keeps its shard
    ensemble = GeneratorEnsemble(
        args.generators or args.num_classes, args.num_classes, image_size=args.image_size, channels=args.channels,
        latent_dim=arch.latent_dim, widths=arch.widths, output_bn=arch.output_bn,
    )
    summary = pipeline.train_generators(
        teacher, ensemble, args.out, steps=args.steps, ctx=ctx, device=device, resume=args.resume,
        overwrite=args.overwrite, input_space=space, **s,
    )
    if ctx.is_main:
        print(json.dumps(summary, indent=2))
    return summary


def distill(args: argparse.Namespace) -> dict:
    """Under torchrun: DistributedDataParallel student, each process sampling its shard of generators."""
    space = input_space_arg(args.input_space, None)
    device = local_device(args.device)
    ctx = init_from_env(device)
    ensemble = load_ensemble(args.generators, "cpu")
    n, c = ensemble.num_classes, ensemble.spec.channels
    space = input_space_arg(args.input_space, c, f"the generators' images ({args.generators})")
    _check_generators_space(args.generators, space)
    teacher = _loaded(args, args.teacher, n, c, args.teacher_weights, "--teacher-weights", "teacher")
    student = _model(args.student, n, c)
    loader = None
    if args.eval:
        loader, data_classes = eval_loader_in("--eval", args.eval, space, image_size=ensemble.spec.image_size)
        if data_classes != n:
            raise ValueError(f"--eval data has {data_classes} classes but the teacher has {n}")
    summary = pipeline.distill(
        teacher, student, ensemble, args.out, steps=args.steps, ctx=ctx, device=device, eval_loader=loader,
        resume=args.resume, overwrite=args.overwrite, input_space=space,
        settings=flags_to_settings(args, DistillSettings), loop=flags_to_settings(args, LoopSettings),
    )
    if ctx.is_main:
        print(json.dumps(summary, indent=2))
    return summary


def evaluate(args: argparse.Namespace) -> dict:
    space = input_space_arg(args.input_space, args.channels)
    device = local_device(args.device)
    loader, data_classes = eval_loader_in("--data", args.data, space, batch_size=args.batch_size,
                                          image_size=args.image_size)
    num_classes = args.num_classes or data_classes
    if num_classes != data_classes:
        raise ValueError(f"the model has {num_classes} classes but {args.data} has {data_classes}")
    channels = args.channels or next(iter(loader))[0].shape[1]
    model = _loaded(args, args.model, num_classes, channels, args.weights, "--weights", "model").to(device)
    result = {"accuracy": evaluate_accuracy(model, loader, device), "data": args.data,
              "input_space": pipeline.space_record(space)["spec"]}
    print(json.dumps(result))
    return result


def models(args: argparse.Namespace) -> list[str]:
    """fastdfd's registry names and the zoos' status; with --zoo, that zoo's names."""
    if args.zoo:
        names = list_zoo_models(args.zoo, args.pattern)
        for name in names:
            print(f"{args.zoo}:{name}")
        return names
    names = [n for n in list_models() if args.pattern.lower() in n.lower()]
    print("fastdfd's registry:")
    for name in names:
        print(f"  {name}")
    print("the zoos (random weights; published ones with --pretrained / --weights-enum; trained ones from --weights):")
    for zoo, status in zoo_status().items():
        print(f"  {zoo + ':NAME':<18} {status}  (fastdfd models --zoo {zoo} lists the names)")
    return names
