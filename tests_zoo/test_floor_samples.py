"""The suite's own rule: where the noise floor's first sample leaves the tapped run outside the
bound, rules() draws the further samples and takes the largest error; where it does not, none."""

import torch

import zoo

CASE = "timm:tf_efficientnet_lite0"


def _fake(monkeypatch, tapped_err: float, first_floor_err: float, extra_errs: list[float]):
    """measure / measure64 / extra_floors of one case replaced by tensors at chosen norm-wise errors
    from a fixed float64 reference (the untapped run at 1e-7)."""
    ref = torch.ones(100, dtype=torch.float64)
    direction = torch.zeros(100, dtype=torch.float64)
    direction[0] = 10.0  # ||direction|| / ||ref|| = 1

    def at(err):
        return (ref + err * direction).float()

    r = {"case": zoo.CASES_BY_ID[CASE], "out": at(tapped_err), "ref_out": at(1e-7), "grad": at(tapped_err),
         "ref_grad": at(1e-7), "floor_out": at(first_floor_err), "floor_grad_tensor": at(first_floor_err)}
    drawn = []

    def extra_floors(case_id):
        drawn.append(case_id)
        return [(at(e), at(e)) for e in extra_errs]

    monkeypatch.setattr(zoo, "measure", lambda case_id: r)
    monkeypatch.setattr(zoo, "measure64", lambda case_id: {"ref_out": ref, "ref_grad": ref})
    monkeypatch.setattr(zoo, "extra_floors", extra_floors)
    return drawn


def test_no_further_samples_when_the_first_is_enough(monkeypatch):
    drawn = _fake(monkeypatch, tapped_err=1e-6, first_floor_err=1e-6, extra_errs=[1e-2])
    rr = zoo.rules(CASE)
    assert rr["grad"]["ok"] and rr["grad"]["floor_samples"] == 1 and not drawn


def test_a_flip_in_a_further_sample_admits_the_tapped_flip(monkeypatch):
    # the tapped run flips a decision (6e-4), the first floor sample does not, the third further one does
    drawn = _fake(monkeypatch, tapped_err=6e-4, first_floor_err=1e-6, extra_errs=[1e-6, 1e-6, 6e-4, 1e-6])
    rr = zoo.rules(CASE)
    assert rr["grad"]["ok"] and rr["grad"]["floor_samples"] == 5 and drawn
    assert abs(rr["grad"]["floor"] - 6e-4) < 1e-8


def test_an_error_no_floor_sample_reaches_fails(monkeypatch):
    _fake(monkeypatch, tapped_err=5e-3, first_floor_err=1e-6, extra_errs=[1e-6, 6e-4, 1e-6])
    rr = zoo.rules(CASE)
    assert not rr["grad"]["ok"] and not rr["logit"]["ok"] and rr["grad"]["floor_samples"] == 4
    assert rr["grad"]["bound"] < rr["grad"]["tapped"]
