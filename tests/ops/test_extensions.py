"""Building the csrc/ extensions: cache, opt-out, and a failed build that falls back with one warning."""

import ctypes
import warnings
from pathlib import Path

import pytest
import torch

import fastdfd
from fastdfd.cli import main
from fastdfd.ops import dispatch
from fastdfd.ops import extensions

from ..conftest import require_backend


@pytest.fixture
def fresh_loader(monkeypatch):
    """Forget built extensions and warnings for the duration of a test."""
    monkeypatch.setattr(extensions, "_LOADED", {})
    monkeypatch.setattr(extensions, "_WARNED", set())
    monkeypatch.setattr(dispatch, "_WARNED", set())
    torch._dynamo.reset()  # a compiled graph keeps the backend it was traced with
    yield
    torch._dynamo.reset()


def test_cpp_is_the_cpu_default_when_it_builds():
    module, why = extensions.load("cpu")
    require_backend("cpp", why, "backend (the cpu extension)")
    assert dispatch.resolve("moment_tap", torch.zeros(1, 1))[0] == "cpp"
    assert (extensions.cache_dir() / f"fastdfd_cpu-{extensions.build_key(extensions.SPECS['cpu'])}").is_dir()


def test_cpu_extension_runs_parallel_for_on_every_thread():
    """ATen's parallel_for opens its OpenMP region inline: an extension built without -fopenmp ran serially."""
    module, why = extensions.load("cpu")
    require_backend("cpp", why, "backend (the cpu extension)")
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("one intra-op thread here")
    assert module.parallel_threads_used(max(64, 4 * threads)) == threads


def test_cpu_extension_uses_torchs_openmp_runtime():
    """-fopenmp links libgomp.so.1 by soname: it must resolve to the runtime torch uses, not a second one.

    (Other libraries may bring their own copy, scikit-learn does; what matters is the extension's.)"""
    module, why = extensions.load("cpu")
    require_backend("cpp", why, "backend (the cpu extension)")
    torch_cpu = next(Path(torch.__file__).parent.joinpath("lib").glob("libtorch_cpu.*"), None)
    if torch_cpu is None or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch is not an OpenMP build with a libtorch_cpu to compare against")

    def resolved(path) -> int:  # dlsym through the library's own dependencies
        return ctypes.cast(ctypes.CDLL(str(path)).omp_set_num_threads, ctypes.c_void_p).value

    assert resolved(module.__file__) == resolved(torch_cpu)


def test_a_compiler_without_openmp_builds_the_serial_extension(monkeypatch, fresh_loader):
    built = []

    def fake_build(spec, verbose):
        built.append(list(spec.cflags))
        return (None, "clang: error: unsupported option '-fopenmp'") if "-fopenmp" in spec.cflags else ("module", None)

    monkeypatch.setattr(extensions, "_build", fake_build)
    with pytest.warns(RuntimeWarning, match="built without OpenMP"):
        assert extensions.load("cpu") == ("module", None)
    assert "-fopenmp" in built[0] and "-fopenmp-simd" in built[1] and "-fopenmp" not in built[1]


def test_no_ext_switch_falls_back_silently(monkeypatch, fresh_loader):
    monkeypatch.setenv("FASTDFD_NO_EXT", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("moment_tap", torch.zeros(1, 1))[0] == "torch"
        x = torch.randn(4, 3, 2, 2)
        fastdfd.bn_moment_loss(x, torch.zeros(3), torch.ones(3))


def test_failed_build_warns_once_with_the_reason_and_falls_back(monkeypatch, fresh_loader, tmp_path):
    broken = extensions.ExtensionSpec("fastdfd_broken", ["does_not_exist.cpp"])
    monkeypatch.setitem(extensions.SPECS, "cpu", broken)
    monkeypatch.setenv("FASTDFD_EXT_DIR", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="cpu extension is unavailable"):
        assert dispatch.resolve("moment_tap", torch.zeros(1, 1))[0] == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert dispatch.resolve("moment_tap", torch.zeros(1, 1))[0] == "torch"


def test_a_compile_error_is_reported_by_its_first_error_line():
    root = extensions.csrc_dir()
    log = (f"Error building extension 'fastdfd_cpu_0': [1/4] c++ -c {root}/moment/moment_cpu.cpp -o moment_cpu.o\n"
           f"FAILED: moment_cpu.o\n{root}/moment/moment_cpu.cpp:439:1: error: expected unqualified-id before 'this'\n"
           "  439 | this is not C++;\n[2/4] c++ -c fastdfd_cpu.cpp\nninja: build stopped: subcommand failed.\n")
    assert extensions.build_error(log) == "csrc/moment/moment_cpu.cpp:439:1: error: expected unqualified-id before 'this'"
    assert extensions.build_error("something else went wrong\nat the end") == "at the end"


def test_missing_tools_are_named(monkeypatch):
    monkeypatch.setattr(extensions.shutil, "which", lambda name: None)
    assert "ninja" in extensions.missing_tools(extensions.SPECS["cpu"])


def test_build_ext_command(capsys):
    assert main(["build-ext", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("cpu")
