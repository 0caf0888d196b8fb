"""``fastdfd train-generators``, ``distill`` and ``evaluate`` for a user's own teacher."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..data import make_eval_loader
from ..models import create_model, list_models
from ..nn import GeneratorEnsemble, load_ensemble, save_ensemble
from ..distributed import init_from_env
from ..ops import KINDS
from ..train import Distiller, GeneratorTrainer, evaluate_accuracy


def load_weights(model: nn.Module, path: str | Path, what: str) -> nn.Module:
    """Load a state dict (plain, or under 'state_dict'/'model'/'student') into ``model``, with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model", "student"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{what} weights {path} do not match the architecture: {str(e).splitlines()[0]}") from e
    return model


def _device(name: str | None) -> torch.device:
    """--device, else this process's GPU (LOCAL_RANK under torchrun), else the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _chunk(value: str):
    return value if value == "auto" else int(value)


def _model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    return create_model(name, num_classes=num_classes, in_channels=in_channels)


def add_commands(sub: argparse._SubParsersAction) -> None:
    models = ", ".join(list_models())

    p = sub.add_parser("train-generators", help="train a generator ensemble from a teacher alone")
    p.add_argument("--teacher", required=True, help=f"registry name ({models})")
    p.add_argument("--weights", required=True, help="teacher state_dict file")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--channels", type=int, default=3, help="image channels")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--generators", type=int, default=None, help="ensemble size K (default: one per class)")
    p.add_argument("--latent-dim", type=int, default=100)
    p.add_argument("--widths", default="128,64", help="generator widths, comma separated")
    p.add_argument("--no-output-bn", action="store_true", help="drop the generator's final scale-only BN")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32, help="images per generator per step")
    p.add_argument("--generators-per-step", type=_chunk, default=None,
                   help="generators per step (default all); 'auto': the largest that fits the GPU's free memory")
    p.add_argument("--kind", choices=KINDS, default="kl")
    p.add_argument("--scope", choices=("generator", "ensemble"), default="generator")
    p.add_argument("--moment-weight", type=float, default=10.0)
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--tv-weight", type=float, default=0.0)
    p.add_argument("--first-layer-multiplier", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
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
    p.add_argument("--teacher", required=True)
    p.add_argument("--teacher-weights", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--generators", required=True, help="generators.pt written by train-generators")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32, help="images per generator per step")
    p.add_argument("--generators-per-step", type=int, default=None)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default=None, help="evaluate on: digits, cifar10:ROOT, cifar100:ROOT, folder:ROOT")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=distill)

    p = sub.add_parser("evaluate", help="top-1 accuracy of a model on real data")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--num-classes", type=int, default=None, help="default: the data's class count")
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--data", required=True, help="digits, cifar10:ROOT, cifar100:ROOT or folder:ROOT")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.set_defaults(func=evaluate)


def train_generators(args: argparse.Namespace) -> dict:
    """Under torchrun each process trains its shard of the ensemble; rank 0 writes generators.pt."""
    device = _device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = init_from_env(device)
    teacher = load_weights(_model(args.teacher, args.num_classes, args.channels), args.weights, "teacher").to(device)
    out = Path(args.out)
    torch.manual_seed(args.seed)  # every process builds the same initial ensemble, then keeps its shard
    ensemble = GeneratorEnsemble(
        args.generators or args.num_classes, args.num_classes, image_size=args.image_size, channels=args.channels,
        latent_dim=args.latent_dim, widths=[int(w) for w in args.widths.split(",")],
        output_bn=not args.no_output_bn,
    )
    if ctx.world > 1:
        ensemble = ensemble.shard(*ctx.shard(ensemble.num_generators))
    if not args.offload:
        ensemble = ensemble.to(device)
    trainer = GeneratorTrainer(
        teacher, ensemble, kind=args.kind, scope=args.scope, moment_weight=args.moment_weight,
        ce_weight=args.ce_weight, tv_weight=args.tv_weight, first_layer_multiplier=args.first_layer_multiplier,
        batch_size=args.batch_size, generators_per_step=args.generators_per_step, lr=args.lr, seed=args.seed,
        log_path=out / "metrics.csv", checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every,
        distributed=ctx, sample_every=args.sample_every, sample_dir=out / "samples", autocast=args.bf16,
        channels_last=args.bf16, offload=args.offload,
        cuda_graph={"off": False, "auto": "auto", "on": True}[getattr(args, "cuda_graph", "off")],
    )
    if ctx.is_main:
        print(trainer.placement)
        if trainer.memory_plan is not None:
            print(f"memory plan: {trainer.memory_plan.describe()}")
    if args.resume and trainer.resume() and ctx.is_main:
        print(f"resumed at step {trainer.step}")
    trainer.fit(max(0, args.steps - trainer.step))
    # collectives on every rank; rank 0 puts the shards back together and writes the ensemble
    shards = ctx.all_gather_object({k: v.detach().cpu() for k, v in ensemble.state_dict().items()})
    classes = [c for part in ctx.all_gather_object(ensemble.classes) for c in part]
    summary = {"steps": trainer.step, "final": trainer.history[-1] if trainer.history else {},
               "generators": str(out / "generators.pt"), "processes": ctx.world}
    if ctx.is_main:
        full = GeneratorEnsemble.from_config({**ensemble.config(), "num_generators": len(classes), "classes": classes})
        full.load_state_dict({k: torch.cat([s[k] for s in shards]) for k in shards[0]})
        save_ensemble(full, out / "generators.pt")
        print(json.dumps(summary, indent=2))
    ctx.barrier()
    return summary


def distill(args: argparse.Namespace) -> dict:
    """Under torchrun: DistributedDataParallel student, each process sampling its shard of generators."""
    device = _device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = init_from_env(device)
    ensemble = load_ensemble(args.generators, "cpu")
    if ctx.world > 1:
        ensemble = ensemble.shard(*ctx.shard(ensemble.num_generators))
    ensemble = ensemble.to(device)
    n, c = ensemble.num_classes, ensemble.spec.channels
    teacher = load_weights(_model(args.teacher, n, c), args.teacher_weights, "teacher").to(device)
    student = _model(args.student, n, c).to(device)
    out = Path(args.out)
    loader = None
    if args.eval:
        loader, data_classes = make_eval_loader(args.eval, image_size=ensemble.spec.image_size)
        if data_classes != n:
            raise ValueError(f"--eval data has {data_classes} classes but the teacher has {n}")
    distiller = Distiller(
        teacher, student, ensemble, temperature=args.temperature, batch_size=args.batch_size,
        generators_per_step=args.generators_per_step, optimizer=args.optimizer, lr=args.lr,
        total_steps=args.steps, seed=args.seed, log_path=out / "metrics.csv",
        checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every, distributed=ctx,
    )
    if args.resume and distiller.resume() and ctx.is_main:
        print(f"resumed at step {distiller.step}")
    distiller.fit(max(0, args.steps - distiller.step))
    if not ctx.is_main:  # the student is the same on every rank (DDP); rank 0 writes and evaluates
        ctx.barrier()
        return {"steps": distiller.step}
    torch.save(student.state_dict(), out / "student.pt")
    summary = {"steps": distiller.step, "student": str(out / "student.pt")}
    if loader is not None:
        summary["student_accuracy"] = distiller.evaluate(loader)
        summary["teacher_accuracy"] = evaluate_accuracy(teacher, loader, device)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    ctx.barrier()
    return summary


def evaluate(args: argparse.Namespace) -> dict:
    device = _device(args.device)
    loader, data_classes = make_eval_loader(args.data, batch_size=args.batch_size)
    num_classes = args.num_classes or data_classes
    if num_classes != data_classes:
        raise ValueError(f"the model has {num_classes} classes but {args.data} has {data_classes}")
    channels = args.channels or next(iter(loader))[0].shape[1]
    model = load_weights(_model(args.model, num_classes, channels), args.weights, "model").to(device)
    result = {"accuracy": evaluate_accuracy(model, loader, device), "data": args.data}
    print(json.dumps(result))
    return result
