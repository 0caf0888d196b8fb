"""pipeline.distill with turns: the warm-up's generator trainer goes on, in rounds with the student, from a pool."""

import json

import pytest
import torch

from fastdfd.distributed import DistContext
from fastdfd.models import create_model
from fastdfd.nn import GeneratorEnsemble, load_ensemble
from fastdfd.pipeline import distill, train_generators
from fastdfd.settings import ExecutionSettings, LoopSettings, LossSettings, OptimizerSettings, TurnsSettings
from fastdfd.train import GeneratorTrainer

from .conftest import randomize_bn_stats

CPU = torch.device("cpu")


def _teacher():
    torch.manual_seed(0)
    return randomize_bn_stats(create_model("digits_teacher", num_classes=10)).eval()


def _ensemble():
    torch.manual_seed(1)
    return GeneratorEnsemble(10, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4))


def _student():
    torch.manual_seed(2)
    return create_model("digits_student", num_classes=10)


def _settings(checkpoint_every=2):
    return dict(loss=LossSettings(), optim=OptimizerSettings(batch_size=4), execution=ExecutionSettings(),
                loop=LoopSettings(progress=False, checkpoint_every=checkpoint_every, seed=3))


def _warm_up(tmp_path, teacher, steps=3, final_checkpoint=True):
    gens = tmp_path / "generators"
    train_generators(teacher, _ensemble(), gens, ctx=DistContext(), device=CPU, steps=steps,
                     input_space="minus_one_one", quality_per_class=0, final_checkpoint=final_checkpoint,
                     **_settings())
    return gens


def _in_turns(tmp_path, teacher, gens, turns, steps=3, resume=False):
    from fastdfd.settings import DistillSettings

    return distill(teacher, _student(), load_ensemble(gens / "generators.pt"), tmp_path / "distill", steps=steps,
                   ctx=DistContext(), device=CPU, input_space="minus_one_one", resume=resume,
                   settings=DistillSettings(batch_size=2), loop=LoopSettings(progress=False, checkpoint_every=2),
                   turns=turns, generators=gens, generator_settings=_settings())


def test_the_generators_go_on_as_one_uninterrupted_trainer(tmp_path):
    teacher = _teacher()
    gens = _warm_up(tmp_path, teacher)
    # the warm-up's last step (3) is saved beside checkpoint_every's (2), for the turns to continue from
    assert sorted(p.name for p in (gens / "checkpoints").glob("step_*.pt")) == ["step_00000002.pt",
                                                                                 "step_00000003.pt"]
    summary = _in_turns(tmp_path, teacher, gens, TurnsSettings(pool=32, generator_steps=1, student_steps=2))
    # rounds: 1 generator step, 2 student steps; then 1 and the last student step
    assert summary["steps"] == 3 and summary["generator_steps"] == 5
    assert summary["turns"] == {"pool": 32, "generator_steps": 1, "student_steps": 2}
    # the same trainer, never stopped, gives the same generators bit for bit: the turns continued its Adam moments
    # and its random stream, and the student's steps do not touch the generators
    reference = _ensemble()
    GeneratorTrainer(teacher, reference, input_space="minus_one_one", **_settings(checkpoint_every=0)).fit(5)
    turned = load_ensemble(tmp_path / "distill" / "generators.pt")
    for name, value in reference.state_dict().items():
        assert torch.equal(turned.state_dict()[name], value), name
    # the warm-up's file is left as it was: the student's checkpoints are keyed to it
    warm = load_ensemble(gens / "generators.pt")
    assert not torch.equal(warm.state_dict()["fc_z"], turned.state_dict()["fc_z"])
    # one log of the generators' steps, each once
    rows = (gens / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "distill" / "summary.json").read_text())["generator_steps"] == 5
    # the rounds write one TensorBoard event file per log, not one per round's fit (the warm-up wrote one before)
    pytest.importorskip("tensorboard")
    assert len(list((gens / "tensorboard" / "metrics").glob("events.out.tfevents.*"))) == 2
    assert len(list((tmp_path / "distill" / "tensorboard" / "metrics").glob("events.out.tfevents.*"))) == 1


def test_a_resumed_stage_takes_the_generators_of_the_students_round(tmp_path, capsys):
    teacher = _teacher()
    gens = _warm_up(tmp_path, teacher)
    turns = TurnsSettings(pool=32, generator_steps=1, student_steps=2)
    _in_turns(tmp_path, teacher, gens, turns, steps=3)
    uninterrupted = load_ensemble(tmp_path / "distill" / "generators.pt").state_dict()
    # as if the stage had stopped after the student's step-2 checkpoint: the generators saved with it, at the end
    # of its round (step 4), are taken, not their newest (5), which is dropped
    assert {p.name for p in (gens / "checkpoints").glob("step_*.pt")} >= {"step_00000004.pt", "step_00000005.pt"}
    capsys.readouterr()
    summary = _in_turns(tmp_path, teacher, gens, turns, steps=3, resume=True)
    assert "generators: in turns with the student from step 4 (the student's step 2)" in capsys.readouterr().out
    assert summary["steps"] == 3 and summary["generator_steps"] == 5  # one more round: 1 generator step, 1 student
    # the generators do not depend on the student: they end as they did without the stop, bit for bit
    resumed = load_ensemble(tmp_path / "distill" / "generators.pt").state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())


def test_fresh_images_from_the_ensemble_as_it_stands_need_no_pool(tmp_path):
    teacher = _teacher()
    gens = _warm_up(tmp_path, teacher)
    summary = _in_turns(tmp_path, teacher, gens, TurnsSettings(pool=0, generator_steps=2, student_steps=3), steps=4)
    assert summary["steps"] == 4 and summary["generator_steps"] == 3 + 2 * 2


def test_turns_without_the_warm_ups_last_step_are_refused(tmp_path):
    teacher = _teacher()
    gens = _warm_up(tmp_path, teacher, final_checkpoint=False)  # saved at 2 only
    with pytest.raises(ValueError, match=r"no checkpoint of the generators between the warm-up's last step \(3\)"):
        _in_turns(tmp_path, teacher, gens, TurnsSettings())
    with pytest.raises(ValueError, match="turns= continues the generators' trainer: pass generators="):
        distill(teacher, _student(), _ensemble(), tmp_path / "d2", steps=1, ctx=DistContext(), device=CPU,
                turns=TurnsSettings())
    with pytest.raises(ValueError, match="generators= and generator_settings= are for turns="):
        distill(teacher, _student(), _ensemble(), tmp_path / "d2", steps=1, ctx=DistContext(), device=CPU,
                generators=gens)
    with pytest.raises(ValueError, match="must not offload them"):
        distill(teacher, _student(), _ensemble(), tmp_path / "d2", steps=1, ctx=DistContext(), device=CPU,
                turns=TurnsSettings(), generators=gens,
                generator_settings={**_settings(), "execution": ExecutionSettings(offload=True)})
    assert not (tmp_path / "d2").exists()


def test_a_pool_no_generator_step_fills_is_refused():
    with pytest.raises(ValueError, match="pool = 64 needs generator_steps >= 1"):
        TurnsSettings(pool=64, generator_steps=0)
    assert TurnsSettings(pool=0, generator_steps=0).pool == 0
    with pytest.raises(ValueError, match="student_steps"):
        TurnsSettings(student_steps=0)
