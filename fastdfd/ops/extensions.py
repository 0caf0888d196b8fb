"""Build the csrc/ extensions on first use: torch.utils.cpp_extension + ninja, cached.

The build folder is keyed by a hash of the sources, the flags, the compiler and the
torch/Python versions, so a changed source or toolchain rebuilds and an unchanged one
loads in milliseconds. Before building, the tools are checked (ninja, a C++ compiler,
nvcc for CUDA) so that a machine without them gets a clear reason instead of a compiler
log. Any failure returns ``None`` with the reason; the caller falls back to another
backend, and one warning says why. ``FASTDFD_NO_EXT=1`` turns the extensions off (silently:
that is the user's choice). ``FASTDFD_EXT_DIR`` moves the cache (default
``~/.cache/fastdfd/extensions``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import torch


def csrc_dir() -> Path:
    """csrc/ of the source tree (editable installs), else the copy installed inside the package."""
    here = Path(__file__).resolve().parent.parent  # fastdfd/
    for candidate in (here.parent / "csrc", here / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("fastdfd's csrc/ sources are not installed")


@dataclass
class ExtensionSpec:
    name: str
    sources: list[str]  # relative to csrc/ (one folder per op: csrc/moment/, csrc/generator/)
    cflags: list[str] = field(default_factory=list)
    cuda_cflags: list[str] = field(default_factory=list)
    ldflags: list[str] = field(default_factory=list)
    needs_cuda: bool = False


SPECS = {
    # -march=native: built on first use on the machine that runs it (the CPU is in the cache key).
    # -fopenmp: ATen's parallel_for is a header template that opens `#pragma omp parallel` itself
    # (AT_PARALLEL_OPENMP builds, the pip wheels): compiled without it, every parallel_for here ran
    # on one thread. The link resolves libgomp.so.1 to the copy torch has already loaded.
    "cpu": ExtensionSpec("fastdfd_cpu", ["fastdfd_cpu.cpp", "moment/moment_cpu.cpp", "moment/moment_library_cpu.cpp",
                                         "generator/generator_cpu.cpp"],
                         cflags=["-O3", "-march=native", "-fopenmp"], ldflags=["-fopenmp"]),
    "cuda": ExtensionSpec("fastdfd_cuda", ["moment/moment_cuda_binding.cpp", "moment/moment_cuda.cu"],
                          cflags=["-O3"], cuda_cflags=["-O3", "--use_fast_math"], needs_cuda=True),
}

_LOADED: dict[str, tuple[ModuleType | None, str | None]] = {}
_WARNED: set[str] = set()


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except Exception:
        return "unknown"


def missing_tools(spec: ExtensionSpec) -> str | None:
    """Why this machine cannot build ``spec``, or None."""
    if shutil.which("ninja") is None:
        return "ninja is not on PATH (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) on PATH"
    if spec.needs_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        if torch.version.cuda is None:
            return "this torch build has no CUDA"
        if CUDA_HOME is None:
            return "nvcc / CUDA_HOME not found"
    return None


def _cpu_fingerprint() -> str:
    try:
        flags = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "model name"))]
        return "|".join(sorted(set(flags)))
    except OSError:
        return platform.processor()


def _headers(spec: ExtensionSpec) -> set[str]:
    """The headers a build of ``spec`` can include: csrc/'s own and those beside each source."""
    root = csrc_dir()
    folders = {root} | {(root / s).parent for s in spec.sources}
    return {p.relative_to(root).as_posix() for d in folders for pat in ("*.h", "*.cuh") for p in d.glob(pat)}


def build_key(spec: ExtensionSpec) -> str:
    h = hashlib.sha256()
    root = csrc_dir()
    for src in sorted(set(spec.sources) | _headers(spec)):
        h.update(src.encode())
        h.update((root / src).read_bytes())
    h.update(" ".join(spec.cflags + spec.cuda_cflags + spec.ldflags).encode())
    h.update(_tool_version([os.environ.get("CXX", "c++"), "--version"]).encode())
    h.update(f"{torch.__version__}|{sys.version}|{platform.machine()}|{_cpu_fingerprint()}".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("FASTDFD_EXT_DIR", Path.home() / ".cache" / "fastdfd" / "extensions"))


def _build(spec: ExtensionSpec, verbose: bool) -> tuple[ModuleType | None, str | None]:
    try:
        from torch.utils.cpp_extension import load as cpp_load

        key = build_key(spec)
        build = cache_dir() / f"{spec.name}-{key}"
        build.mkdir(parents=True, exist_ok=True)
        root = csrc_dir()
        module = cpp_load(
            name=f"{spec.name}_{key}", sources=[str(root / s) for s in spec.sources],
            # copies: torch's load() appends to the lists it is given (the build key hashes them)
            extra_cflags=list(spec.cflags), extra_cuda_cflags=list(spec.cuda_cflags),
            extra_ldflags=list(spec.ldflags), build_directory=str(build),
            verbose=verbose,
        )
        return module, None
    except Exception as e:  # compiler error, missing headers, ...
        return None, f"building {spec.name} failed: {build_error(str(e)) or type(e).__name__}"


def build_error(log: str) -> str:
    """The line of a failed build's log that says why: the compiler's first error, else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower() and not ln.startswith("Error building extension")]
    line = errors[0] if errors else (lines[-1] if lines else "")
    return line.replace(f"{csrc_dir()}/", "csrc/")


def load(which: str, verbose: bool = False) -> tuple[ModuleType | None, str | None]:
    """The built extension ``which`` ("cpu" or "cuda"), building it if needed: (module, None) or (None, why)."""
    if which in _LOADED:
        return _LOADED[which]
    if os.environ.get("FASTDFD_NO_EXT", "").strip() not in ("", "0"):
        return None, "FASTDFD_NO_EXT is set"
    spec = SPECS[which]
    why = missing_tools(spec)
    module = None
    if why is None:
        module, why = _build(spec, verbose)
        if module is None and "-fopenmp" in spec.cflags:
            # a compiler without OpenMP (Apple clang): the same kernels, their loops on one thread
            serial = replace(spec, cflags=[f if f != "-fopenmp" else "-fopenmp-simd" for f in spec.cflags],
                             ldflags=[f for f in spec.ldflags if f != "-fopenmp"])
            module, _ = _build(serial, verbose)
            if module is not None:
                warnings.warn(f"fastdfd: the {which} extension was built without OpenMP ({why}); its loops run on "
                              "one thread", RuntimeWarning, stacklevel=2)
                why = None
    if why is not None and which not in _WARNED:
        _WARNED.add(which)
        warnings.warn(f"fastdfd: the {which} extension is unavailable ({why}); using the next backend",
                      RuntimeWarning, stacklevel=3)
    _LOADED[which] = (module, why)
    return _LOADED[which]


# Dispatch asks this on every call, torch.compile's trace included. Traced, the first call's
# build-and-load (os.stat, hashlib, the compiler) broke the graph, and failed under
# fullgraph=True; it is run eagerly instead and its answer, fixed for the process, kept as a constant.
# A compiled graph keeps the backend it was traced with (FASTDFD_NO_EXT set later does not reach it;
# torch._dynamo.reset() retraces).
@torch.compiler.assume_constant_result
def unavailable(which: str) -> str | None:
    """Why the extension ``which`` cannot be used in this process, or None when it is loaded."""
    return load(which)[1]

