"""Kill and resume at ImageNet scale: a run of K generators killed at a random step and resumed ends with the
same ensemble, bit for bit, as the same run uninterrupted.

    python -m benchmarks.imagenet_resume --generators 1000 --steps-per-generator 3 --checkpoint-every 20 \\
        --out runs/resume [--offload-path-on-cpu] [--seed 0]

Both runs are ``python -m benchmarks.imagenet_ensemble`` subprocesses (the public trainer, the memory planner's
automatic chunk, rotating checkpoints). The victim is sent SIGKILL (no clean stop, no last checkpoint) at a
random moment after its first checkpoint is on disk, then started again with ``--resume``; every tensor of the
two ``ensemble.pt`` files is compared with ``torch.equal``. ``OUT/resume.json`` holds the step killed at, the
step resumed from, the checkpoint bytes and seconds, and the verdict.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch


def _run_args(args, out: Path, ckpt: Path) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.imagenet_ensemble", "--generators", str(args.generators),
           "--image-size", str(args.image_size), "--steps-per-generator", str(args.steps_per_generator),
           "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(args.checkpoint_every), "--curve-every", "0",
           "--log-every", "1", "--skip-quality", "--seed", str(args.seed), "--out", str(out), "--minutes", "1e6"]
    return cmd + (["--offload-path-on-cpu"] if args.offload_path_on_cpu else [])


def _checkpoints(ckpt: Path) -> list[Path]:
    return sorted(ckpt.rglob("step_*.pt")) if ckpt.exists() else []


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generators", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps-per-generator", type=int, default=3)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--offload-path-on-cpu", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in ("whole", "whole_ckpt", "killed", "killed_ckpt"):  # this script's own outputs of an earlier run
        shutil.rmtree(out / old, ignore_errors=True)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    whole = subprocess.run(_run_args(args, out / "whole", out / "whole_ckpt"), capture_output=True, text=True)
    if whole.returncode:
        raise SystemExit(f"the uninterrupted run failed:\n{whole.stderr[-3000:]}")
    whole_s = time.perf_counter() - t0
    whole_rec = json.loads((out / "whole" / "result.json").read_text())
    steps, train_s = whole_rec["steps"], whole_rec["train_seconds"]

    log = open(out / "victim.log", "w")
    victim = subprocess.Popen(_run_args(args, out / "killed", out / "killed_ckpt"), stdout=log,
                              stderr=subprocess.STDOUT, text=True)
    while not _checkpoints(out / "killed_ckpt"):
        if victim.poll() is not None:
            raise SystemExit("the victim ended before its first checkpoint")
        time.sleep(0.05)
    # a random moment in the steps that follow (the first checkpoint came after checkpoint_every of them)
    remaining = train_s * (1 - args.checkpoint_every / steps)
    delay = rng.uniform(0.0, max(0.05, 0.7 * remaining))
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    log.close()
    if victim.returncode != -signal.SIGKILL:  # it ended on its own first: nothing was killed
        raise SystemExit(f"the victim ended (exit {victim.returncode}) before it was killed: shorten the delay")
    newest = max(int(p.stem.split("_")[-1]) for p in _checkpoints(out / "killed_ckpt"))
    killed_at = max((int(m) for m in re.findall(r"step (\d+):", (out / "victim.log").read_text())), default=0)
    resumed = subprocess.run(_run_args(args, out / "killed", out / "killed_ckpt") + ["--resume"],
                             capture_output=True, text=True)
    if resumed.returncode:
        raise SystemExit(f"the resumed run failed:\n{resumed.stderr[-3000:]}")
    first_step = min((int(m) for m in re.findall(r"step (\d+):", resumed.stdout)), default=None)
    a = torch.load(out / "whole" / "ensemble.pt", map_location="cpu", weights_only=False)["state"]
    b = torch.load(out / "killed" / "ensemble.pt", map_location="cpu", weights_only=False)["state"]
    if set(a) != set(b):
        raise SystemExit(f"the two ensembles hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    resumed_rec = json.loads((out / "killed" / "result.json").read_text())
    # a resume that did not happen would also end identical (same seed): check that it did, from the newest checkpoint
    resumed_from_newest = (resumed_rec["resumed"] and resumed_rec["start_step"] == newest
                           and first_step == newest + 1 and newest <= killed_at)
    ckpts = _checkpoints(out / "whole_ckpt")
    record = {
        "generators": args.generators, "image_size": args.image_size, "chunk": whole_rec["chunk"],
        "steps": steps, "steps_per_generator": whole_rec["steps_per_generator"],
        "offload_path_on_cpu": args.offload_path_on_cpu, "plan": whole_rec["plan"],
        "checkpoint_every": args.checkpoint_every, "checkpoint_file_bytes": ckpts[-1].stat().st_size if ckpts else None,
        "killed_after_logged_step": killed_at, "kill_delay_seconds": round(delay, 2),
        "newest_checkpoint_at_kill": newest, "resumed_first_step": first_step,
        "resumed_from_newest_checkpoint": resumed_from_newest,
        "resumed_stdout_tail": resumed.stdout.strip().splitlines()[-1:],
        "tensors": len(a), "tensors_differing": differ, "bit_identical": not differ,
        "uninterrupted_seconds": round(whole_s, 1),
    }
    (out / "resume.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("generators", "chunk", "steps", "killed_after_logged_step",
                                             "newest_checkpoint_at_kill", "resumed_first_step", "bit_identical")}),
          flush=True)
    if not record["bit_identical"]:
        raise SystemExit(f"the resumed ensemble differs from the uninterrupted one in {differ[:5]}")
    if not resumed_from_newest:
        raise SystemExit(f"the second run did not resume from the newest checkpoint (step {newest}): {resumed_rec}")
    return record


if __name__ == "__main__":
    main()
