"""Every case of zoo.CASES: a MomentMatcher keeps the teacher exact and its loss right.

Each case is measured once (zoo.measure, cached); each test asserts one property of it.
A matcher that raises fails every check of that case with its message.
"""

import math

import pytest
import torch

import zoo

CASE_IDS = [c.id for c in zoo.CASES]
LOSS_CASE_IDS = [c.id for c in zoo.CASES if c.compares_loss]


def _measured(case_id):
    r = zoo.measure(case_id)
    if r["error"] is not None:
        pytest.fail(f"the matcher run raised: {r['error']}", pytrace=False)
    return r


def _assert_close(got, ref, rtol, what):
    atol = rtol * ref.abs().max().item()
    torch.testing.assert_close(
        got, ref, rtol=rtol, atol=atol,
        msg=lambda m: f"{what}: max rel err {zoo.rel_err(got, ref):.3e} (tolerance {rtol:g})\n{m}",
    )


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_finds_every_bn_layer(case_id):
    """The matcher taps every BN-like layer (FrozenBatchNorm*, BatchNormAct2d, SyncBatchNorm*, ...), and only those."""
    r = zoo.measure(case_id)
    if r["error"] is not None and "layer_names" not in r:
        pytest.fail(f"the matcher refused the teacher: {r['error']}", pytrace=False)
    missing = [n for n in r["bn_names"] if n not in r["layer_names"]]
    extra = [n for n in r["layer_names"] if n not in r["bn_names"]]
    assert not missing and not extra, (
        f"{len(missing)} BN-like layers not tapped (flavours {r['bn_flavours']}), e.g. {missing[:5]}; "
        f"{len(extra)} unexpected, e.g. {extra[:5]}"
    )


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_logits_exact(case_id):
    r = _measured(case_id)
    case = r["case"]
    assert r["out"].dtype == r["ref_out"].dtype
    _assert_close(r["out"], r["ref_out"], case.rtol, f"logits ({case.variant})")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_input_grad_exact(case_id):
    """Gradient of a fixed random projection of the logits w.r.t. the input image."""
    r = _measured(case_id)
    case = r["case"]
    _assert_close(r["grad"], r["ref_grad"], case.rtol, f"input gradient ({case.variant})")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_loss_finite(case_id):
    r = _measured(case_id)
    assert math.isfinite(r["loss"]), r["loss"]
    assert r["loss_grad"] is not None, "m.loss() does not depend on the input"
    assert torch.isfinite(r["loss_grad"]).all(), "gradient of m.loss() w.r.t. the input is not finite"
    assert r["loss_grad"].abs().max() > 0, "gradient of m.loss() w.r.t. the input is zero"


@pytest.mark.parametrize("case_id", LOSS_CASE_IDS)
def test_loss_matches_reference(case_id):
    """m.loss() and m.layer_losses() against the float64 forward-hook reference (KL kind)."""
    r = _measured(case_id)
    ref, got = r["ref_layer_losses"], r["layer_losses"]
    assert set(got) == set(ref), f"layers differ: missing {sorted(set(ref) - set(got))[:5]}, extra {sorted(set(got) - set(ref))[:5]}"
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=zoo.LOSS_RTOL)
    bad = {k: (got[k], ref[k]) for k in ref if got[k] != pytest.approx(ref[k], rel=zoo.LOSS_RTOL, abs=1e-6 * r["ref_loss"])}
    assert not bad, f"{len(bad)} layer losses off, e.g. {dict(list(bad.items())[:3])}"


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_teacher_restored(case_id):
    """After the matcher is removed: the same module objects, and the state the untapped run
    leaves (eval mode: untouched; train mode: the running statistics updated exactly as the
    untapped train-mode forward updates them)."""
    r = zoo.measure(case_id)
    assert r["restored"], "the teacher's modules are not the original objects after remove()"
    tapped, untapped = r["state_tapped"], r["state_untapped"]
    assert tapped.keys() == untapped.keys()
    for k, ref in untapped.items():
        got = tapped[k]
        if ref.is_floating_point() and r["case"].train:
            _assert_close(got, ref, zoo.FP32_RTOL, f"state {k}")
        else:
            assert torch.equal(got, ref), f"state {k}: {got} != {ref}"


@pytest.mark.parametrize("case_id", zoo.FLOAT64_CASE_IDS)
def test_float64_exact(case_id):
    """Model and input in float64: the tapped teacher's logits, input gradient and (train mode)
    running statistics equal the untapped ones to 1e-10 relative."""
    r = zoo.measure64(case_id)
    assert r["logit"] <= zoo.FP64_RTOL, f"float64 logits: max rel err {r['logit']:.3e}"
    assert r["grad"] <= zoo.FP64_RTOL, f"float64 input gradient: max rel err {r['grad']:.3e}"
    assert r["state"] <= zoo.FP64_RTOL, f"float64 state after the run: max rel err {r['state']:.3e}"
