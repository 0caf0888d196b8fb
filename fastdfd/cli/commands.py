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
from ..models.zoo import ZOOS, list_zoo_models, zoo_status
from ..nn import GeneratorEnsemble, load_ensemble
from ..ops import KINDS
from ..train import evaluate_accuracy

INPUT_SPACE_HELP = (f"the teacher's input normalisation: images are pixels in [0, 1] and the teacher sees "
                    f"(pixels - mean) / std; a preset ({', '.join(PRESETS)}; '[-1,1]' = minus_one_one) or "
                    f"'mean=a,b,c;std=d,e,f' (default identity: the teacher sees pixels)")
WEIGHTS_HELP = ("state_dict file (fastdfd, torchvision or timm layouts: plain, or under state_dict / model / "
                "state_dict_ema; .safetensors with the safetensors package)")


def model_help(what: str = "architecture") -> str:
    return (f"the {what}: a fastdfd registry name ({', '.join(list_models())}), or timm:NAME / torchvision:NAME "
            "(built with random weights, never downloaded; see fastdfd models)")


def _chunk(value: str):
    """--generators-per-step: a positive integer or 'auto'; argparse names the flag in its one-line error."""
    if value == "auto":
        return value
    try:
        return _positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


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
    p.add_argument("--weights", required=True, help=f"the teacher's {WEIGHTS_HELP}")
    p.add_argument("--input-space", default="identity", help=INPUT_SPACE_HELP)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--channels", type=int, default=3, help="image channels")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--generators", type=int, default=None, help="ensemble size K (default: one per class)")
    p.add_argument("--preset", choices=("default", "paper"), default="default",
                   help="generator settings the flags below start from (fastdfd.train.settings; docs/generators.md): "
                        "default, the scale-free loss; paper, Luo et al.'s")
    p.add_argument("--latent-dim", type=int, default=None, help="z dimension (preset: 100)")
    p.add_argument("--widths", default=None, help="generator widths, comma separated (preset: 128,64)")
    p.add_argument("--output-bn", dest="output_bn", action="store_true", default=None,
                   help="the generator's final scale-only BN (the paper's; off in the default preset)")
    p.add_argument("--no-output-bn", dest="output_bn", action="store_false", help="no final BN")
    p.add_argument("--steps", type=_positive_int, default=2000)
    p.add_argument("--batch-size", type=int, default=None, help="images per generator per step (preset: 32; paper 64)")
    p.add_argument("--generators-per-step", type=_chunk, default=None,
                   help="generators per step (default all); 'auto': the largest that fits the GPU's free memory")
    p.add_argument("--kind", choices=KINDS, default="kl")
    p.add_argument("--scope", choices=("generator", "ensemble"), default=None, help="(preset: ensemble; paper generator)")
    p.add_argument("--normalization", choices=("sum", "mean"), default=None,
                   help="the moment loss summed or averaged over channels and layers (preset: mean; paper sum)")
    p.add_argument("--moment-weight", type=float, default=None, help="(preset: 10)")
    p.add_argument("--ce-weight", type=float, default=None, help="(preset: 0.1; paper 1)")
    p.add_argument("--tv-weight", type=float, default=0.0)
    p.add_argument("--first-layer-multiplier", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="Adam's (preset: 1e-2; paper 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run's files in OUT first")
    p.add_argument("--sample-every", type=int, default=0, help="write OUT/samples/step_N.png every N steps")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast and a channels_last teacher (GPUs)")
    p.add_argument("--offload", action="store_true",
                   help="keep the generators and their Adam states in pinned host memory, stream each chunk")
    p.add_argument("--cuda-graph", nargs="?", const="auto", default="off", choices=("off", "auto", "on"),
                   help="replay the step from a CUDA graph: bare flag or 'auto' where allowed (else eager, "
                        "the reason printed), 'on' to require it")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=train_generators)

    p = sub.add_parser("distill", help="distill a student from a teacher and a generator ensemble")
    p.add_argument("--teacher", required=True, help=model_help("teacher's architecture"))
    p.add_argument("--teacher-weights", required=True, help=f"the teacher's {WEIGHTS_HELP}")
    p.add_argument("--student", required=True, help=model_help("student's architecture"))
    p.add_argument("--input-space", default="identity",
                   help=INPUT_SPACE_HELP + "; the same as train-generators was given (checked against its "
                                           "summary.json), and the --eval data are fed in it")
    p.add_argument("--generators", required=True, help="generators.pt written by train-generators")
    p.add_argument("--steps", type=_positive_int, default=2000)
    p.add_argument("--batch-size", type=int, default=32, help="images per generator per step")
    p.add_argument("--generators-per-step", type=_positive_int, default=None)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default=None,
                   help="evaluate on: digits, cifar10:ROOT, cifar100:ROOT, folder:ROOT (in --input-space)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run's files in OUT first")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=distill)

    p = sub.add_parser("evaluate", help="top-1 accuracy of a model on real data")
    p.add_argument("--model", required=True, help=model_help())
    p.add_argument("--weights", required=True, help=f"the model's {WEIGHTS_HELP}")
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


def _generator_settings(args: argparse.Namespace):
    """The --preset's GeneratorSettings with every flag the user gave laid over it."""
    from ..train.settings import preset

    given = {"scope": args.scope, "normalization": args.normalization, "moment_weight": args.moment_weight,
             "ce_weight": args.ce_weight, "lr": args.lr, "batch_size": args.batch_size, "output_bn": args.output_bn,
             "latent_dim": args.latent_dim,
             "widths": None if args.widths is None else tuple(int(w) for w in args.widths.split(","))}
    return preset(args.preset).replace(**{k: v for k, v in given.items() if v is not None})


def train_generators(args: argparse.Namespace) -> dict:
    """Under torchrun each process trains its shard of the ensemble; rank 0 writes generators.pt."""
    space = input_space_arg(args.input_space, args.channels)
    device = local_device(args.device)
    ctx = init_from_env(device)
    teacher = load_weights(_model(args.teacher, args.num_classes, args.channels), args.weights, "teacher")
    s = _generator_settings(args)
    torch.manual_seed(args.seed)  # every process builds the same initial ensemble, then keeps its shard
    ensemble = GeneratorEnsemble(
        args.generators or args.num_classes, args.num_classes, image_size=args.image_size, channels=args.channels,
        **s.ensemble_kwargs(),
    )
    summary = pipeline.train_generators(
        teacher, ensemble, args.out, steps=args.steps, ctx=ctx, device=device, resume=args.resume,
        overwrite=args.overwrite,
        offload=args.offload, kind=args.kind, scope=s.scope, normalization=s.normalization,
        moment_weight=s.moment_weight, ce_weight=s.ce_weight, tv_weight=args.tv_weight,
        first_layer_multiplier=args.first_layer_multiplier, batch_size=s.batch_size,
        generators_per_step=args.generators_per_step, lr=s.lr, betas=s.betas, seed=args.seed,
        checkpoint_every=args.checkpoint_every, sample_every=args.sample_every, autocast=args.bf16,
        channels_last=args.bf16, cuda_graph=args.cuda_graph, input_space=space,
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
    teacher = load_weights(_model(args.teacher, n, c), args.teacher_weights, "teacher")
    student = _model(args.student, n, c)
    loader = None
    if args.eval:
        loader, data_classes = eval_loader_in("--eval", args.eval, space, image_size=ensemble.spec.image_size)
        if data_classes != n:
            raise ValueError(f"--eval data has {data_classes} classes but the teacher has {n}")
    summary = pipeline.distill(
        teacher, student, ensemble, args.out, steps=args.steps, ctx=ctx, device=device, eval_loader=loader,
        resume=args.resume, overwrite=args.overwrite, temperature=args.temperature, batch_size=args.batch_size,
        generators_per_step=args.generators_per_step, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, input_space=space,
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
    model = load_weights(_model(args.model, num_classes, channels), args.weights, "model").to(device)
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
    print("the zoos (random weights, never downloaded; trained weights come from --weights):")
    for zoo, status in zoo_status().items():
        print(f"  {zoo + ':NAME':<18} {status}  (fastdfd models --zoo {zoo} lists the names)")
    return names
