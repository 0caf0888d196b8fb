"""Ahead-of-time compilation of every kernel configuration, without a GPU.

    python -m fastdfd.kernels.tools.aot [--arch 80 --arch 90] [--json report.json] [--jobs module:attr]

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
Triton -> PTX -> cubin pipeline for the target chip. It rejects what the interpreter lets
through (unsupported casts, layouts, register-file overflows), and the cubin tells the
resources each configuration needs: registers, stack and local memory (spills), and the
local loads/stores in its SASS, read with the cuobjdump that ships with the Triton in use;
shared memory is Triton's dynamic allocation (the cubin's static figure on sm_90 is only
the 1 KiB that sm_90 reserves for every block). Configurations are those the launchers pick at
the layer shapes of CIFAR ResNet-34 and ImageNet ResNet-50, in NCHW and channels_last, for
every dtype and flag; ``--jobs`` swaps in another iterable of (name, fn, signature,
constexprs, num_warps). Run it in a process *without* TRITON_INTERPRET (the interpreter
replaces jitted functions); exits non-zero, with a line naming each configuration, on a
compile error, a spill or any local memory, or registers above the limit (aot_rules).
Several Triton versions at once: :mod:`fastdfd.kernels.tools.aot_versions`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .aot_rules import failures

# (N, C, P) of BN inputs: CIFAR ResNet-34 at batch 256, ImageNet ResNet-50 at batch 64,
# a BatchNorm1d head, and the digits demo under per-generator statistics.
LAYER_SHAPES = [
    (256, 64, 1024), (256, 128, 256), (256, 256, 64), (256, 512, 16),
    (64, 64, 12544), (64, 64, 3136), (64, 256, 3136), (64, 128, 784), (64, 512, 784),
    (64, 256, 196), (64, 1024, 196), (64, 512, 49), (64, 2048, 49),
    (256, 512, 1), (320, 32, 256), (320, 128, 16),
]
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _tap_configs(programs: int) -> list[tuple[bool, int, int]]:
    from ..moment.tap import tap_config

    seen = set()
    for n, c, p in LAYER_SHAPES:
        for channels_last in (False, True):
            cfg = tap_config(n, c, p, 1, channels_last and c > 1, programs)
            seen.add((channels_last and c > 1, cfg["BLOCK_C"], cfg["BLOCK_J"]))
    return sorted(seen)


def _jobs(programs: int = 528):
    from ..moment import finalize as fin
    from ..moment import tap as tap
    from ..moment.layout import ACTIVATION_IDS, KIND_IDS

    for channel_contig, block_c, block_j in _tap_configs(programs):
        layout = "channels_last" if channel_contig else "nchw"
        unit = {"stride_c": 1} if channel_contig else {"stride_p": 1}
        for dt, ptr in DTYPES.items():
            # every activation epilogue on every tile in fp32 (its registers grow with the tile: SiLU's sigmoid
            # on the widest tiles is where a spill would show), identity in fp16/bf16 (the same epilogue code
            # after the loads' conversion to fp32)
            acts = tuple(ACTIVATION_IDS.items()) if dt == "fp32" else (("identity", 0),)
            # the residual epilogue (one more load forward, a load and a store backward) on every tile in fp32,
            # with ReLU (the basic block's) and SiLU (the most registers)
            with_residual = ("relu", "silu") if dt == "fp32" else ()
            for write_y in (True, False):
                sig = {
                    "x_ptr": ptr, "y_ptr": ptr, "part1_ptr": "*fp32", "part2_ptr": "*fp32", "mean_ptr": "*fp32",
                    "var_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "r_ptr": ptr, "C": "i32", "P": "i32",
                    "rows_per_group": "i32", "chunk": "i32", "stride_n": "i64", "stride_c": "i32", "stride_p": "i32",
                    "eps": "fp32", "slope": "fp32", "SPLIT": "i32",
                }
                for act, aid in acts if write_y else (("identity", 0),):
                    for has_r in (False, True) if write_y and act in with_residual else (False,):
                        const = {"WRITE_Y": write_y, "HAS_W": True, "HAS_B": True, "ACT": aid, "HAS_R": has_r,
                                 "BLOCK_C": block_c, "BLOCK_J": block_j}
                        res = "+r" if has_r else ""
                        yield (f"tap_fwd {layout} {dt} y={int(write_y)} {act}{res} {block_c}x{block_j}",
                               tap._tap_fwd_kernel, sig, {**const, **unit}, tap.NUM_WARPS)
            for has_dy in (True, False):
                sig = {
                    "x_ptr": ptr, "dy_ptr": ptr, "dx_ptr": ptr, "ds1_ptr": "*fp32", "ds2_ptr": "*fp32",
                    "mean_ptr": "*fp32", "var_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "r_ptr": ptr,
                    "dr_ptr": ptr, "C": "i32", "P": "i32",
                    "rows_per_group": "i32", "chunk": "i32", "stride_n": "i64", "stride_c": "i32", "stride_p": "i32",
                    "eps": "fp32", "slope": "fp32", "SPLIT": "i32",
                }
                for act, aid in acts if has_dy else (("identity", 0),):
                    for has_r in (False, True) if has_dy and act in with_residual else (False,):
                        const = {"HAS_DY": has_dy, "HAS_W": True, "HAS_B": True, "ACT": aid, "HAS_R": has_r,
                                 "BLOCK_C": block_c, "BLOCK_J": block_j}
                        res = "+r" if has_r else ""
                        yield (f"tap_bwd {layout} {dt} dy={int(has_dy)} {act}{res} {block_c}x{block_j}",
                               tap._tap_bwd_kernel, sig, {**const, **unit}, tap.NUM_WARPS)
    for kind, kid in KIND_IDS.items():
        base = {"s1_ptr": "*fp32", "s2_ptr": "*fp32", "count_ptr": "*fp32", "var_ptr": "*fp32", "eps_ptr": "*fp32",
                "offsets_ptr": "*i32"}
        yield (f"finalize_fwd {kind}", fin._finalize_fwd_kernel,
               {**base, "out_ptr": "*fp32", "C_total": "i32"}, {"KIND": kid, "BLOCK": fin.BLOCK}, 4)
        yield (f"finalize_bwd {kind}", fin._finalize_bwd_kernel,
               {**base, "dout_ptr": "*fp32", "ds1_ptr": "*fp32", "ds2_ptr": "*fp32", "C_total": "i32"},
               {"KIND": kid, "BLOCK": fin.BLOCK}, 4)


# Generator layers (cin, cout, upsample): the paper's CIFAR generator (widths 128, 64, RGB
# output) and the digits demo's (widths 32, 16, one channel).
GENERATOR_LAYERS = [(128, 128, 2), (128, 64, 2), (64, 3, 1), (32, 32, 2), (32, 16, 2), (16, 1, 1)]
GENERATOR_FC = [(64, 8192, 100), (4, 8192, 100), (128, 8192, 100), (8, 512, 64)]  # (batch, features, latent)


def _generator_jobs():
    from ..generator import conv as gc
    from ..generator import linear_gather as gf
    from fastdfd.models.generator import LEAKY_SLOPE

    elem_bytes = {"fp32": 4, "bf16": 2}  # generators train in fp32 or bf16
    for dt, ptr in DTYPES.items():
        if dt not in elem_bytes:
            continue
        for cfg in sorted({tuple(gf.linear_gather_config(*shape).items()) for shape in GENERATOR_FC}):
            sig = {"z_ptr": ptr, "wz_ptr": ptr, "wy_ptr": ptr, "local_ptr": "*i64", "h_ptr": ptr,
                   "part1_ptr": "*fp32", "part2_ptr": "*fp32", "B": "i32", "L": "i32", "D": "i32", "NCLS": "i32"}
            c = dict(cfg)
            yield (f"gen_fc {dt} {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}", gf._linear_gather_kernel, sig,
                   {"STATS": True, **c}, gf.NUM_WARPS)
        for cin, cout, up in GENERATOR_LAYERS:
            cfgs = gc.conv_configs(cin, cout, elem_bytes[dt])
            last = up == 1
            flags = {"UP": up, "PROLOGUE": True, "SLOPE": LEAKY_SLOPE, "TANH": last}
            base = {"B": "i32", "CIN": "i32", "COUT": "i32", "H": "i32", "W": "i32"}
            yield (f"gen_conv_fwd {dt} {cin}->{cout} up{up}", gc._conv_fwd_kernel,
                   {"x_ptr": ptr, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "wt_ptr": ptr, "bias_ptr": ptr,
                    "y_ptr": ptr, "part1_ptr": "*fp32", "part2_ptr": "*fp32", **base},
                   {**flags, "HAS_BIAS": last, "STATS": True, **cfgs["fwd"]}, gc.NUM_WARPS)
            grads = {"dy_ptr": ptr, "t_ptr": ptr, "ds1_ptr": "*fp32", "ds2_ptr": "*fp32"}
            yield (f"gen_conv_dgrad {dt} {cin}->{cout} up{up}", gc._conv_dgrad_kernel,
                   {"x_ptr": ptr, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "wt_ptr": ptr, **grads,
                    "dx_ptr": ptr, "part1_ptr": "*fp32", "part2_ptr": "*fp32", **base},
                   {**flags, **cfgs["dgrad"]}, gc.NUM_WARPS)
            yield (f"gen_conv_wgrad {dt} {cin}->{cout} up{up}", gc._conv_wgrad_kernel,
                   {"x_ptr": ptr, "scale_ptr": "*fp32", "shift_ptr": "*fp32", **grads, "dwt_ptr": "*fp32", **base},
                   {**flags, **cfgs["wgrad"]}, gc.NUM_WARPS)


def _resources(cubin: bytes) -> dict:
    """reg / stack / local / shared_static from cuobjdump -res-usage, local_ops from the SASS.

    STACK is where ptxas spills; LOCAL is other per-thread local memory; LDL/STL count every
    local-memory access the code makes, whatever the resource table says.
    """
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():  # no figures at all: aot_rules fails every row rather than pass it
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    if "shared" in found:
        found["shared_static"] = found.pop("shared")
    if sass:
        found["local_ops"] = len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\s", sass))
    return found


def _mma(ptx: str) -> str:
    """The tensor-core instruction of tl.dot, as "wgmma m64n32k16 bf16": wgmma (Hopper's
    warpgroup MMA, B operand in shared memory) or mma.sync (Ampere's, per warp); empty without a dot."""
    found = re.findall(r"\b(wgmma|mma)\.[\w.]*?\.(m\d+n\d+k\d+)(?:\.row\.col)?\.f32\.(\w+)\.", ptx)
    return ", ".join(f"{'wgmma' if op == 'wgmma' else 'mma.sync'} {shape} {dt}" for op, shape, dt in sorted(set(found)))


def all_jobs():
    """Every configuration the launchers pick."""
    return [*_jobs(), *_generator_jobs()]


def _error_line(e: Exception) -> str:
    # Triton's CompilationError puts the source position first and the reason last
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def compile_all(archs: list[int], jobs=None) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jobs = list(all_jobs() if jobs is None else jobs)
    rows = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, sig, const, warps in jobs:
            full_sig = {**sig, **{k: "constexpr" for k in const}}
            row = {"triton": triton.__version__, "arch": f"sm_{arch}", "kernel": name}
            try:
                compiled = triton.compile(ASTSource(fn, full_sig, constexprs=const), target=target,
                                          options={"num_warps": warps})
                row.update(ok=True, num_warps=compiled.metadata.num_warps, shared=compiled.metadata.shared,
                           mma=_mma(compiled.asm["ptx"]), **_resources(compiled.asm["cubin"]))
            except Exception as e:  # report every failure, not just the first
                row.update(ok=False, error=_error_line(e))
            rows.append(row)
    return rows


def _load_jobs(spec: str):
    module, _, attr = spec.partition(":")
    jobs = getattr(importlib.import_module(module), attr or "JOBS")
    return jobs() if callable(jobs) else jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 80 and 90)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--jobs", help="module:attr, configurations to compile instead of the launchers' own")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs the real JIT", file=sys.stderr)
        return 2
    rows = compile_all(args.arch or [80, 90], _load_jobs(args.jobs) if args.jobs else None)
    for r in rows:
        if r["ok"]:
            print(f"{r['arch']}  {r['kernel']:<44} regs {r.get('reg', '?'):>3}  stack {r.get('stack', '?'):>4} B"
                  f"  local {r.get('local', '?'):>4} B  ldl/stl {r.get('local_ops', '?'):>3}"
                  f"  shared {r['shared']:>6} B  warps {r['num_warps']}  {r['mma']}")
        else:
            print(f"{r['arch']}  {r['kernel']:<44} FAILED  {r['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = failures(rows)
    for line in bad:
        print(line)
    import triton

    compiled = sum(r["ok"] for r in rows)
    print(f"triton {triton.__version__}: {compiled} compiled, {len(rows) - compiled} failed to compile, "
          f"{len(bad)} failed the check")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
