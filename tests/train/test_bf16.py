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


def test_the_check_is_oneDNNs_and_falls_back_to_the_capability_name(monkeypatch):
    bf16.cpu_computes_bf16.cache_clear()
    try:
        assert bf16.cpu_computes_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

        class NoCheck:  # a build whose mkldnn namespace lacks the check
            pass

        monkeypatch.setattr(torch.ops, "mkldnn", NoCheck())
        for name, expected in (("AVX2", False), ("AVX512", True), ("DEFAULT", False)):
            bf16.cpu_computes_bf16.cache_clear()
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda name=name: name)
            assert bf16.cpu_computes_bf16() is expected, name
    finally:
        monkeypatch.undo()
        bf16.cpu_computes_bf16.cache_clear()


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
