"""Every csrc/ source compiles: the CUDA kernels with nvcc for sm_80 and sm_90 (no GPU needed),
and the torch-facing CUDA binding against this torch's headers."""

import re
import shutil
import subprocess
import sysconfig

import pytest

from fastdfd.ops.extensions import csrc_dir

CUDA_SOURCES = sorted(p.relative_to(csrc_dir()).as_posix() for p in csrc_dir().glob("*/*.cu"))  # one folder per op
assert CUDA_SOURCES, f"no CUDA source under {csrc_dir()}/<op>/"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_sources_compile_with_nvcc(source, arch, tmp_path):
    cmd = ["nvcc", "-c", str(csrc_dir() / source), "-o", str(tmp_path / "k.o"), "-std=c++17", "-O3",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    usage = re.findall(r"Compiling entry function '(\w+)'[^\n]*\n[^\n]*\n\s*(\d+) bytes stack frame, (\d+) bytes spill "
                       r"stores, (\d+) bytes spill loads\n[^\n]*Used (\d+) registers(.*)", proc.stderr)
    for name, stack, spill_st, spill_ld, regs, rest in usage:  # the resource report (-s / -rA shows it)
        print(f"sm_{arch} {name[-70:]:<70} regs {regs:>3} stack {stack} B spills {spill_st}/{spill_ld} B{rest}")
    assert usage, "ptxas printed no resource usage:\n" + proc.stderr[-2000:]
    assert all(st == "0" and ld == "0" for _, _, st, ld, _, _ in usage), "register spills"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_cuda_binding_compiles_against_torch_headers():
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{csrc_dir()}"]
    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=fastdfd_cuda_check",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, str(csrc_dir() / "moment" / "moment_cuda_binding.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
