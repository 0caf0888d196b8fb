"""Every case of zoo.CASES: a MomentMatcher keeps the teacher's function and its loss right.

Each case is measured once (zoo.measure: fp32 or autocast, untapped and tapped; zoo.measure64:
float64, untapped = ref64 and, outside autocast, tapped; both cached); each test asserts one
property of it. A matcher that raises fails every check of that case with its message.

* test_float64_exact: in float64 the tapped teacher IS the teacher (<= 1e-10 relative).
* test_logits_vs_float64 / test_input_grad_vs_float64: in fp32 (autocast) the tapped run is
  as accurate as the untapped one -- norm-wise err(tapped, ref64) <= 2 max(err(untapped, ref64), err(floor, ref64))
  + atol (zoo's module docstring). The strict elementwise 1e-5 figure is only reported.
* test_wrong_tap_is_caught: both criteria still fail on a deliberately wrong tap.
"""

import math

import pytest
import torch
from torch import nn

import zoo
from fastdfd.nn import flavours
from fastdfd.nn import tap as tap_module

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


def _assert_rule(rr, what, case):
    assert rr["ok"], (
        f"{what} ({case.variant}): norm-wise err vs float64 reference: tapped {rr['tapped']:.3e} > "
        f"{zoo.RULE_FACTOR:g} x max(untapped {rr['untapped']:.3e}, floor {rr['floor']:.3e} (largest of "
        f"{rr['floor_samples']} samples)) + atol {case.rule_atol:g} = {rr['bound']:.3e}"
    )


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_logits_vs_float64(case_id):
    """Logits: norm-wise err(tapped, ref64) <= 2 max(err(untapped, ref64), err(floor, ref64)) + atol."""
    r = _measured(case_id)
    case = r["case"]
    assert r["out"].dtype == r["ref_out"].dtype
    _assert_rule(zoo.rules(case_id)["logit"], "logits", case)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_input_grad_vs_float64(case_id):
    """Gradient of a fixed random projection of the logits w.r.t. the input image: the same rule."""
    r = _measured(case_id)
    _assert_rule(zoo.rules(case_id)["grad"], "input gradient", r["case"])


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


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_float64_exact(case_id):
    """Model and input in float64: the tapped teacher's logits, input gradient and (train mode)
    running statistics equal the untapped ones to 1e-10 relative (max |a - b| / max |b|)."""
    case = zoo.CASES_BY_ID[case_id]
    if not case.float64_tapped:
        pytest.skip("autocast: the case is the low-precision run itself; its float64 reference "
                    "(untapped, no autocast) serves test_logits/input_grad_vs_float64")
    r = zoo.measure64(case_id)
    assert r["logit"] <= zoo.FP64_RTOL, f"float64 logits: max rel err {r['logit']:.3e}"
    assert r["grad"] <= zoo.FP64_RTOL, f"float64 input gradient: max rel err {r['grad']:.3e}"
    assert r["state"] <= zoo.FP64_RTOL, f"float64 state after the run: max rel err {r['state']:.3e}"


# --------------------------------------------------------------------------- self-check
# A deliberately wrong tap, on one layer: its BN output times (1 + 1e-3) ("scale"), or a timm
# norm+act layer's activation left out ("drop_act"). Both criteria must catch it.
WRONG_SCALE = 1e-3
WRONG_TAPS = [
    ("timm:regnetx_002", "scale"),      # BatchNormAct2d
    ("timm:regnetx_002", "drop_act"),   # BatchNormAct2d
    ("torchvision:resnet18", "scale"),  # plain BatchNorm2d
]


def _has_act(module) -> bool:
    return not isinstance(getattr(module, "act", None), (nn.Identity, type(None)))


@pytest.mark.parametrize(("wrong_case", "wrong"), WRONG_TAPS, ids=[f"{c}-{w}" for c, w in WRONG_TAPS])
def test_wrong_tap_is_caught(wrong_case, wrong, monkeypatch):
    """Self-check of the suite (a per-test row of the report's other_tests, not a case's check)."""
    case_id = wrong_case
    case = zoo.CASES_BY_ID[case_id]
    r, r64 = _measured(case_id), zoo.measure64(case_id)  # the right taps' runs, before the patch
    assert zoo.rules(case_id)["logit"]["ok"] and zoo.rules(case_id)["grad"]["ok"], "the right tap fails already"
    # the layer to break: the middle one (for drop_act: of those with an activation)
    layers = zoo.bn_layers(zoo.build(case))
    names = [n for n, m in layers if wrong == "scale" or _has_act(m)]
    target = names[len(names) // 2]
    target_slot = [n for n, _ in layers].index(target)  # the matcher numbers the unique BN layers in this order
    right = flavours.Flavour.apply_epilogue
    hits = []

    def wrong_epilogue(self, module, y):
        if module.slot != target_slot:
            return right(self, module, y)
        hits.append(module.slot)
        if wrong == "scale":
            return right(self, module, y * (1 + WRONG_SCALE))
        drop = getattr(module, "drop", None)
        return drop(y) if drop is not None else y

    monkeypatch.setattr(flavours.Flavour, "apply_epilogue", wrong_epilogue)
    # timm's norm + act layers apply their act inside the tap when they can (BNTap.own_activation), where no
    # epilogue runs to break: this self-check plants its error in the epilogue path, so it turns that off
    monkeypatch.setattr(tap_module, "fusable_epilogue", lambda module, flavour: None)
    out, grad = zoo.tapped_run(case, torch.float32)
    out64, grad64 = zoo.tapped_run(case, torch.float64)
    assert len(hits) == 2, f"the wrong tap on {target} ran {len(hits)} times, not once per run"
    # the untapped floor runs rules() may draw (cached for the session) must not run under the patch
    monkeypatch.undo()
    rr = zoo.rules(case.id, out=out, grad=grad)  # the rule the tests assert, extra floor samples and all
    caught = {
        "fp32 rule, logits": not rr["logit"]["ok"],
        "fp32 rule, input gradient": not rr["grad"]["ok"],
        "float64, logits": zoo.rel_err(out64, r64["ref_out"]) > zoo.FP64_RTOL,
        "float64, input gradient": zoo.rel_err(grad64, r64["ref_grad"]) > zoo.FP64_RTOL,
    }
    missed = [k for k, v in caught.items() if not v]
    assert not missed, (
        f"wrong tap ({wrong} on {target}) not caught by: {missed}; fp32 logits err "
        f"{zoo.norm_err(out, r64['ref_out']):.3e}, grad err {zoo.norm_err(grad, r64['ref_grad']):.3e}"
    )
