"""torch.distributed generator training: 2 CPU processes (gloo) against 1 process.

The ensemble is sharded (2 generators per rank). With scope="ensemble" the moment loss
needs the statistics of the *global* batch: one all-reduce of the packed sums per step
must make the 2-process run equal the 1-process run on the same global batch.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdfd.distributed import DistContext

from . import dist_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process runs of both scopes (spawning is the slow part: once per module)."""
    out = tmp_path_factory.mktemp("dist")
    for scope in ("ensemble", "generator"):
        mp.start_processes(dist_worker.run, args=(2, str(out / f"init_{scope}"), scope, STEPS, str(out)), nprocs=2,
                           join=True, start_method="spawn")
    return {scope: torch.load(out / f"{scope}.pt", weights_only=True) for scope in ("ensemble", "generator")}


def one_process_gradients(scope, dtype):
    teacher, ensemble = dist_worker.build()
    return dist_worker.first_step_gradients(
        dist_worker.train(teacher.to(dtype), ensemble.to(dtype), None, scope, STEPS))


@pytest.mark.parametrize("scope", ["ensemble", "generator"])
def test_two_processes_give_the_one_process_gradients(runs, scope):
    """Against float64: the 2-process error is within 4x the 1-process fp32 error (+ atol).

    The sums of a global batch are added in another order on two ranks, so the fp32
    results differ from the 1-process ones in the last bits, as two backends' do (the
    moment loss's gradient is ill-conditioned enough that fp32 runs differ from float64 by
    about 3e-4 of the largest entry, either way).
    """
    got = runs[scope]
    ref = one_process_gradients(scope, torch.float64)
    single = one_process_gradients(scope, torch.float32)
    if scope == "ensemble":  # every rank evaluated the loss of the global batch
        assert got["moments"][0] == got["moments"][1] == pytest.approx(ref["moment"], rel=1e-5)
    for name, grad in got["grads"].items():
        assert grad.abs().max() > 0, name
        err = (grad.double() - ref[name]).abs().max().item()
        single_err = (single[name].double() - ref[name]).abs().max().item()
        assert err <= 4 * single_err + 1e-6 * ref[name].abs().max().item(), (name, err, single_err)


def test_per_generator_scope_trains_identically(runs):
    """No collective at all: each rank's generators follow the 1-process trajectory."""
    teacher, ensemble = dist_worker.build()
    dist_worker.train(teacher, ensemble, None, "generator", STEPS).fit(STEPS)
    for name, want in ensemble.state_dict().items():
        torch.testing.assert_close(runs["generator"]["state"][name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_ensemble_scope_training_follows_the_one_process_run(runs):
    """Over several Adam steps the global moment loss stays that of the 1-process run.

    (Parameters are not compared elementwise: Adam's m / sqrt(v) turns the last-bit
    differences of a near-zero gradient into full-size steps of either sign.)
    """
    teacher, ensemble = dist_worker.build()
    history = dist_worker.train(teacher, ensemble, None, "ensemble", STEPS).fit(STEPS)
    for a, b in zip(runs["ensemble"]["history"], history):
        assert a["moment"] == pytest.approx(b["moment"], rel=1e-3)


def test_shards_must_divide_the_ensemble():
    with pytest.raises(ValueError, match="cannot be split evenly over 3"):
        DistContext(0, 3).shard(4)
    assert DistContext(1, 2).shard(4) == (2, 4)


def test_ddp_distillation_keeps_one_student_on_every_rank(tmp_path):
    mp.start_processes(dist_worker.run_distill, args=(2, str(tmp_path / "init"), 3, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    got = torch.load(tmp_path / "distill.pt", weights_only=True)
    a, b = got["states"]
    torch.manual_seed(3)
    from fastdfd.models import create_model

    model = create_model("digits_student", num_classes=10)
    initial = model.state_dict()
    params = [name for name, _ in model.named_parameters()]
    assert any(not torch.equal(a[k], initial[k]) for k in params)  # the student trained
    for name in params:  # DDP averaged the gradients: the replicas never drifted apart
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # (BN running statistics are not compared: DDP broadcasts rank 0's at the start of each
    # forward, so after the last one each rank holds its own batch's update)
    assert not torch.allclose(got["images"][0], got["images"][1])  # each rank samples its own generators
