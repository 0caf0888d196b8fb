"""Layers without running statistics: refused by name by default; skip_without_stats=True leaves them."""

import pytest
import torch
from torch import nn

import fastdfd
import zoo


class Untracked(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                 nn.BatchNorm2d(16, track_running_stats=False), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.mid(self.stem(x)))


def _tracked_teacher():
    """Random plausible statistics on the tracked layers; mid.1 has none."""
    model = Untracked()
    tracked = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in tracked:
            m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def test_layer_without_running_stats_is_refused_by_name():
    model = _tracked_teacher()
    with pytest.raises((ValueError, RuntimeError, TypeError)) as info:
        fastdfd.MomentMatcher(model)
    assert "mid.1" in str(info.value), str(info.value)
    # nothing stays swapped after the refusal
    assert not any(type(m).__name__ == "BNTap" for m in model.modules())


def test_skip_without_stats_leaves_the_layer_and_warns():
    model = _tracked_teacher()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    untracked = model.mid[1]
    with pytest.warns(Warning, match="mid.1"):
        m = fastdfd.MomentMatcher(model, skip_without_stats=True)
    with m:
        assert "mid.1" not in m.layer_names
        assert sorted(m.layer_names) == ["head.1", "stem.1"]
        assert model.mid[1] is untracked  # left untouched
        out = model(x)
        loss = m.loss()
    torch.testing.assert_close(out.detach(), ref, rtol=zoo.FP32_RTOL, atol=zoo.FP32_RTOL * ref.abs().max().item())
    assert torch.isfinite(loss)


def test_unmaterialized_lazy_bn_is_refused_by_name():
    """A LazyBatchNorm2d that has not seen an input has no statistics yet (zoo.TinyLazy is
    materialised by one forward before it is tested)."""
    model = zoo.TinyLazy().eval()
    with pytest.raises((ValueError, RuntimeError)) as info:
        fastdfd.MomentMatcher(model)
    assert "body.1" in str(info.value), str(info.value)
