"""The teacher's input space: presets, parsing, the maps, and sample grids in pixel space."""

import pytest
import torch

from fastdfd.input_space import PRESETS, InputSpace, generator_pixels
from fastdfd.train.images import grid


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_and_match_the_generator_map(name):
    space = InputSpace.parse(name)
    channels = len(space.mean) if len(space.mean) > 1 else 2
    pixels = torch.rand(3, channels, 5, 4, dtype=torch.float64)
    x = space.normalize(pixels)
    mean = torch.tensor(space.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(space.std, dtype=torch.float64).view(1, -1, 1, 1)
    torch.testing.assert_close(x, (pixels - mean) / std)
    torch.testing.assert_close(space.denormalize(x), pixels)
    g = pixels * 2 - 1
    torch.testing.assert_close(space.from_generator(g), x)


def test_imagenet_figures_and_aliases():
    space = InputSpace.parse("imagenet")
    assert space.mean == (0.485, 0.456, 0.406) and space.std == (0.229, 0.224, 0.225)
    assert InputSpace.parse("[-1, 1]") == InputSpace.parse("minus_one_one")
    assert InputSpace.parse(None) == InputSpace.parse("identity")
    custom = InputSpace.parse("mean=0.5,0.4,0.3;std=0.2,0.2,0.25")
    assert custom.mean == (0.5, 0.4, 0.3) and custom.name == "custom"


def test_minus_one_one_hands_the_generator_output_over_unchanged():
    g = torch.rand(2, 1, 4, 4) * 2 - 1
    assert InputSpace.parse("minus_one_one").from_generator(g) is g


@pytest.mark.parametrize("spec, match", [
    ("imagenet22k", "unknown input space"),
    ("mean=0.5;std=0", "std must be positive"),
    ("mean=0.5,0.5;std=0.2", "same, non-zero number"),
    ("mean=a;std=1", "not a list of numbers"),
    ("mean=0.5", "needs both mean= and std="),
    ("scale=2;std=1", "expected 'mean="),
])
def test_bad_specs_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        InputSpace.parse(spec)


def test_channel_mismatch_named():
    with pytest.raises(ValueError, match="'cifar10' has 3 channels of mean/std but the images have 1"):
        InputSpace.parse("cifar10").normalize(torch.rand(2, 1, 4, 4))


def test_gradients_flow_through_the_generator_map():
    g = (torch.rand(2, 3, 4, 4) * 2 - 1).requires_grad_()
    InputSpace.parse("imagenet").from_generator(g).sum().backward()
    torch.testing.assert_close(g.grad[0, :, 0, 0], 0.5 / torch.tensor([0.229, 0.224, 0.225]))


def test_grids_show_pixels_not_rescaled_images():
    g = torch.tensor([-1.0, -0.5, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)  # an output BN can leave [-1, 1]
    canvas = grid(generator_pixels(g), rows=1)
    torch.testing.assert_close(canvas.view(-1), torch.tensor([0.0, 0.25, 0.5, 1.0, 1.0]))
