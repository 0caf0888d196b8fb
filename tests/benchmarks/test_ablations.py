"""benchmarks/ablations.py in quick mode, its README splice, and the Distiller's student_bn option."""

import copy
import json

import pytest
import torch

from benchmarks.ablations import BEGIN, END, budget, main, replace_between_markers, variants
from fastdfd import Distiller, GeneratorEnsemble
from fastdfd.models import create_model


def test_quick_ablations_run_every_variant(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{BEGIN}\nold\n{END}\ny\n")
    out = tmp_path / "abl"
    assert main(["--quick", "--out", str(out), "--readme", str(readme)]) == 0
    assert readme.read_text() == f"x\n{BEGIN}\nold\n{END}\ny\n"  # --quick never touches the README
    results = json.loads((out / "results.json").read_text())
    names = [v.name for v in variants(budget(True))]
    assert len(names) == 11 and names[0] == "baseline"
    assert [r["variant"] for r in results["runs"]] == names  # one seed, every variant ran
    for run in results["runs"]:
        assert {"variant", "seed", "accuracy", "teacher_accuracy", "seconds", "settings"} <= set(run)
        assert 0.0 <= run["accuracy"] <= 1.0 and run["seconds"] > 0
        assert 0.0 <= run["teacher_top1_on_generated"] <= 1.0
    by = {r["variant"]: r for r in results["runs"]}
    assert by["single_same_budget"]["settings"]["num_generators"] == 1
    assert by["kind_l2"]["settings"]["kind"] == "l2" and by["scope_generator"]["settings"]["scope"] == "generator"
    assert by["student_bn_per_generator"]["settings"]["distill_student_bn"] == "per_generator"
    assert by["normalization_sum"]["settings"]["normalization"] == "sum"
    assert by["ce_weight_1"]["settings"]["ce_weight"] == 1.0
    paper = by["paper_preset"]["settings"]
    assert paper["output_bn"] is True and paper["normalization"] == "sum" and paper["scope"] == "generator"
    counts = results["generator_parameters"]
    assert abs(counts["single_same_capacity"] - counts["ensemble"]) < 0.03 * counts["ensemble"]
    assert by["single_same_capacity"]["generator_parameters"] == counts["single_same_capacity"]
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| variant | what changes | student accuracy")
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:2 + len(names)]] == names


def test_readme_replacement_touches_only_the_marked_block(tmp_path):
    path = tmp_path / "README.md"
    head, tail = "# t\n\n## Ablations\nintro\n", "\nafter\n## Benchmarks\nkeep\n"
    path.write_text(f"{head}{BEGIN}\nold table\n{END}{tail}")
    replace_between_markers(path, "| a | b |\n")
    assert path.read_text() == f"{head}{BEGIN}\n| a | b |\n{END}{tail}"
    replace_between_markers(path, "new")
    assert path.read_text() == f"{head}{BEGIN}\nnew\n{END}{tail}"
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        replace_between_markers(path, "x")


def _nets(k=3):
    torch.manual_seed(0)
    teacher = create_model("digits_teacher", num_classes=k).eval()
    student = create_model("digits_student", num_classes=k)
    ensemble = GeneratorEnsemble(k, k, image_size=8, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
    return teacher, student, ensemble


def test_student_bn_per_generator_is_a_loop_over_generator_blocks():
    teacher, student, ensemble = _nets()
    d = Distiller(teacher, student, ensemble, batch_size=4, progress=False, student_bn="per_generator")
    x, _ = ensemble.sample(4, rng=torch.Generator().manual_seed(1))
    looped, mixed_net = copy.deepcopy(student).train(), copy.deepcopy(student).train()
    student.train()
    got = d.student_logits(x)
    want = torch.cat([looped(block) for block in x.split(4)])  # the student run on each generator alone
    torch.testing.assert_close(got, want)
    for (name, a), b in zip(student.named_buffers(), looped.buffers()):  # running stats: one update per block
        torch.testing.assert_close(a, b, msg=name)
    mixed = mixed_net(x)
    assert (got - mixed).abs().max() > 1e-3  # per-block batch statistics differ from the mixed batch's
    mixed_d = Distiller(teacher, copy.deepcopy(mixed_net), ensemble, batch_size=4, progress=False)
    assert mixed_d.student_bn == "mixed" and "student_bn" not in mixed_d.config()
    assert d.config()["student_bn"] == "per_generator"
    rows = d.fit(2)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["kd"])) for r in rows)
    with pytest.raises(ValueError, match="student_bn"):
        Distiller(teacher, student, ensemble, student_bn="per_class")
