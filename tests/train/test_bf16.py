"""fastdfd.train.bf16: whether bf16 autocast pays on this CPU, and the warning where it does not."""

import warnings

import pytest
import torch

from fastdfd.models import create_model
from fastdfd.train import GeneratorTrainer, bf16
from fastdfd.train.labeller import TeacherLabeller

from ..conftest import randomize_bn_stats
from .test_trainer import small_ensemble


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(bf16, "cpu_computes_bf16", lambda: False)


@pytest.fixture
def has_bf16(monkeypatch):
    monkeypatch.setattr(bf16, "cpu_computes_bf16", lambda: True)


class _Mkldnn:  # a stand-in for torch.ops.mkldnn: with oneDNN's bf16 check answering `answer`, or without it
    def __init__(self, answer):
        if answer is not None:
            self._is_mkldnn_bf16_supported = lambda: answer


@pytest.mark.parametrize("built, check, machine, capabilities, expected", [
    (True, True, "x86_64", {"avx512_bf16": True}, True),   # the AVX-512 BF16 EPYC where bf16 was 1.24x faster
    (True, True, "x86_64", {"amx_tile": True}, True),
    (True, True, "x86_64", {"avx512_f": True}, False),     # AVX-512 without BF16: software conversion, unmeasured
    (True, False, "x86_64", {}, False),                    # the AVX2 EPYC where bf16 was 4.6x slower
    (True, None, "x86_64", {"avx512_bf16": True}, False),  # no such check in this build
    (False, True, "x86_64", {"avx512_bf16": True}, False),  # no oneDNN: bf16 never reaches it
    (True, True, "aarch64", {}, True),                     # Arm: oneDNN's answer alone
    (True, False, "aarch64", {}, False),
])
def test_the_check(monkeypatch, built, check, machine, capabilities, expected):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: built)
    monkeypatch.setattr(torch.ops, "mkldnn", _Mkldnn(check))
    monkeypatch.setattr(bf16.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    bf16.cpu_computes_bf16.cache_clear()
    try:
        assert bf16.cpu_computes_bf16() is expected
    finally:
        monkeypatch.undo()
        bf16.cpu_computes_bf16.cache_clear()


def test_the_check_on_this_cpu():
    caps = torch.cpu.get_capabilities()
    x86 = bf16.platform.machine().lower() in bf16._X86
    if x86 and not any(caps.get(f, False) for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_f")):
        assert bf16.cpu_computes_bf16() is False  # an x86 CPU without AVX-512 at all (the AVX2 EPYC): fp32
    assert isinstance(bf16.cpu_computes_bf16(), bool)


def test_warns_on_a_cpu_without_bf16_only(no_bf16):
    with pytest.warns(UserWarning, match="the thing runs under bf16 autocast on a CPU without bf16 instructions"):
        assert bf16.warn_if_bf16_is_slow("cpu", "the thing") is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bf16.warn_if_bf16_is_slow("cuda", "the thing") is False  # a card: not this check's business
        assert bf16.warn_if_bf16_is_slow(torch.device("cuda", 0), "the thing") is False


def test_no_warning_where_the_cpu_computes_bf16(has_bf16):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bf16.warn_if_bf16_is_slow("cpu", "the thing") is False


def _labels(autocast, calls=2):
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10)).eval()
    labeller = TeacherLabeller(teacher, autocast=autocast)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            labeller(torch.randn(3, 1, 8, 8))
    return [str(w.message) for w in caught if "bf16" in str(w.message)]


def test_labeller_warns_once_under_autocast_on_a_cpu_without_bf16(no_bf16):
    got = _labels(autocast=True)
    assert len(got) == 1 and "labelling forward" in got[0]
    assert _labels(autocast=False) == []


def test_labeller_is_silent_where_the_cpu_computes_bf16(has_bf16):
    assert _labels(autocast=True) == []


@pytest.mark.parametrize("autocast", [True, False])
def test_generator_trainer_warns_under_autocast_on_a_cpu_without_bf16(no_bf16, autocast):
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GeneratorTrainer(teacher, small_ensemble(k=2, num_classes=10), autocast=autocast, progress=False)
    warned = [w for w in caught if "generators' teacher forward runs under bf16" in str(w.message)]
    assert len(warned) == (1 if autocast else 0)
