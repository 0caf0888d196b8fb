"""The ``fastdfd`` command line: demo, train-teacher, train-generators, distill, evaluate, models, run RECIPE."""

from __future__ import annotations

import argparse
import sys

from ..version import __version__
from ..train.stops import RunInterrupted


def _demo(args: argparse.Namespace) -> dict:
    from .demo import DemoSettings, format_table, run_demo

    settings = DemoSettings.quick(seed=args.seed) if args.quick else DemoSettings(seed=args.seed)
    metrics = run_demo(args.out, settings, progress=not args.no_progress)
    print(format_table(metrics))
    print(f"wrote {args.out}/metrics.json, samples.png, loss_curves.png")
    return metrics


def _build_ext(args: argparse.Namespace) -> dict:
    import time

    from ..ops import extensions

    status = {}
    unknown = sorted(set(args.which) - set(extensions.SPECS))
    if unknown:
        raise ValueError(f"unknown extension(s) {unknown}; expected cpu and/or cuda")
    for which in args.which or ["cpu", "cuda"]:
        start = time.perf_counter()
        module, why = extensions.load(which, verbose=args.verbose)
        status[which] = "built" if module is not None else f"unavailable: {why}"
        print(f"{which:5} {status[which]} ({time.perf_counter() - start:.1f} s; cache {extensions.cache_dir()})")
    return status


def build_parser() -> argparse.ArgumentParser:
    from .commands import add_commands
    from .run import add_run_commands
    from .teacher import add_teacher_command

    parser = argparse.ArgumentParser(prog="fastdfd", description="fast generative data-free knowledge distillation")
    parser.add_argument("--version", action="version", version=f"fastdfd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the data-free pipeline on scikit-learn's digits (CPU, a few minutes)")
    p.add_argument("--quick", action="store_true", help="a tiny run of every stage (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_demo)
    p = sub.add_parser("build-ext", help="build the C++/CUDA extensions ahead of time (else built on first use)")
    p.add_argument("which", nargs="*", help="cpu and/or cuda (default: both)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=_build_ext)
    add_teacher_command(sub)
    add_commands(sub)
    add_run_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"fastdfd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only directory, a full disk: the cause in one line, not a chained traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"fastdfd {args.command}: error: cannot write or read{where}: {e.strerror or e}; the checkpoints already "
              "written are intact", file=sys.stderr)
        return 2
    except RunInterrupted as e:  # SIGINT/SIGTERM after a whole step, saved: one line, 128 + the signal
        print(f"fastdfd {args.command}: {e}", file=sys.stderr)
        return e.exit_status
    finally:
        # under torchrun: the command's trainer (and any DDP wrapper) is gone by now, so the
        # group can be torn down before interpreter exit instead of during it
        from ..distributed import shutdown

        shutdown()
    return 0
