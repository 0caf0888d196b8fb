"""The diversity figure: exact values on known features, collapse seen where it is and not where it is
not, real images as a reference, and the penultimate features read from the classifier's last linear layer."""

import json
import math

import pytest
import torch
from torch import nn

from fastdfd import GeneratorEnsemble
from fastdfd.models import create_model
from fastdfd.train.diversity import COLLAPSE_THRESHOLD, class_diversity, diversity, penultimate_features
from fastdfd.train.quality import generator_quality, reference_diversity, write_quality


def test_identical_rows_are_one_image_and_orthogonal_rows_are_n():
    f = torch.randn(1, 7).repeat(5, 1) * torch.tensor([[1.0], [2.0], [3.0], [0.5], [9.0]])  # scale does not count
    spread, eff = diversity(f)
    assert spread == pytest.approx(0.0, abs=1e-12) and eff == pytest.approx(1.0, abs=1e-9)
    spread, eff = diversity(torch.eye(6)[:4] * 3)
    assert spread == pytest.approx(1.0) and eff == pytest.approx(4.0)
    # two groups of identical rows, orthogonal to each other, 3 + 1 rows: eigenvalues 3/4 and 1/4
    f = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 2]])
    spread, eff = diversity(f)
    assert eff == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert spread == pytest.approx(2 * 3 / (4 * 3))  # the 3 mixed pairs, both orders, over n(n-1)
    assert diversity(torch.randn(1, 3)) == (0.0, 1.0)
    with pytest.raises(ValueError, match="features must be"):
        diversity(torch.randn(0, 3))


def test_class_diversity_groups_rows_by_label():
    f = torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, 1]])
    out = class_diversity(f, torch.tensor([2, 2, 5, 5]))
    assert set(out) == {2, 5} and out[5]["effective_images"] == pytest.approx(1.0) and out[5]["images"] == 2
    assert out[2]["effective_images"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="3 feature rows but 2 labels"):
        class_diversity(f[:3], torch.tensor([0, 1]))


def test_penultimate_features_are_the_last_linear_input():
    model = create_model("cifar_resnet20", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    with penultimate_features(model) as feats:
        model(x)
        model(x[:1])
    expect = torch.flatten(model.avgpool(model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x))))))), 1)
    assert len(feats) == 2 and torch.allclose(feats[0], expect, atol=1e-6) and feats[1].shape == (1, 64)
    assert not model._forward_pre_hooks and not model.linear._forward_pre_hooks  # removed on exit
    with pytest.raises(ValueError, match="no nn.Linear"):
        with penultimate_features(nn.Sequential(nn.Conv2d(3, 3, 1))):
            pass


def _ensemble(collapsed: bool) -> GeneratorEnsemble:
    torch.manual_seed(0)
    ens = GeneratorEnsemble(3, 10, image_size=32, channels=3, latent_dim=16, widths=(16, 8), output_bn=False,
                            classes=[[0], [4], [7]])
    with torch.no_grad():
        if collapsed:  # the latent no longer reaches the image: one image per class, whatever z
            ens.fc_z.zero_()
        else:  # the image is the latent's alone, at full contrast (a fresh generator is nearly collapsed itself)
            ens.fc_y.zero_()
            ens.out_bias.zero_()
            ens.out_weight.mul_(10)
    return ens


def test_quality_report_sees_a_collapsed_ensemble_and_not_a_healthy_one(tmp_path):
    # features = the normalised pixels themselves (an untrained ResNet maps every input near one direction)
    teacher = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    collapsed = generator_quality(teacher, _ensemble(True), n_per_class=16, input_space="imagenet")
    healthy = generator_quality(teacher, _ensemble(False), n_per_class=16, input_space="imagenet")
    assert collapsed.collapsed_classes == [0, 4, 7]
    assert all(d["effective_images"] < 1.01 and d["images"] == 16 for d in collapsed.diversity_per_class.values())
    assert healthy.collapsed_classes == []
    assert min(d["effective_images"] for d in healthy.diversity_per_class.values()) > COLLAPSE_THRESHOLD
    # real reference images: the same figures, from pixels normalised in the same space
    pixels, labels = torch.rand(20, 3, 32, 32), torch.tensor([0] * 10 + [4] * 10)
    report = generator_quality(teacher, _ensemble(False), n_per_class=4, input_space="imagenet",
                               reference=(pixels, labels))
    assert report.reference_diversity_per_class == reference_diversity(teacher, pixels, labels, input_space="imagenet")
    write_quality(report, tmp_path)
    saved = json.loads((tmp_path / "quality.json").read_text())["diversity"]
    assert saved["collapsed_classes"] == [] and set(saved["per_class"]) == {"0", "4", "7"}
    assert set(saved["reference"]["per_class"]) == {"0", "4"} and saved["features"] == "penultimate"
