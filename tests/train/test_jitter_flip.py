"""DeepInversion's jitter and flip in the generators' step (fastdfd.train.augment.jitter_flip,
LossSettings.jitter / flip): the batched gather against torch.roll and torch.flip image by image, its
gradient, the trainer's use of it (eagerly and replayed as a graph), and bad input refused."""

from types import SimpleNamespace

import pytest
import torch

from fastdfd.settings import LossSettings
from fastdfd.train.augment import draw_jitter_flip, jitter_flip

from .test_cuda_graph import CAPTURES, _assert_same, _trainer, spy_graphs, teacher  # noqa: F401 (the fixture)
from .test_trainer import small_ensemble, trainer


def _one_by_one(x, params):
    out = []
    for img, (dy, dx, f) in zip(x, params.tolist()):
        img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
        out.append(torch.flip(img, dims=(2,)) if f else img)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(5, 3, 8, 8), (4, 1, 7, 11), (3, 2, 1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_equals_roll_then_flip_per_image(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    for jitter in (0, 1, 3, 20):  # 20: shifts beyond the image wrap around
        params = draw_jitter_flip(shape[0], jitter, True, g)
        assert torch.equal(jitter_flip(x, params), _one_by_one(x, params))


def test_channels_last_and_slices_are_read_as_they_are():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 9, 9, generator=g)
    params = draw_jitter_flip(4, 4, True, g)
    for view in (x.contiguous(memory_format=torch.channels_last)[:4], x[1:5], x[:, :, :, :][::1][2:6]):
        assert torch.equal(jitter_flip(view, params), _one_by_one(view, params))


def test_gradient_is_the_inverse_permutation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    params = draw_jitter_flip(4, 2, True, g)
    torch.autograd.gradcheck(lambda t: jitter_flip(t, params), (x,))
    dy = torch.randn(4, 2, 6, 5, dtype=torch.float64, generator=g)
    (grad,) = torch.autograd.grad(jitter_flip(x, params), x, dy)
    xr = x.detach().clone().requires_grad_(True)
    (expect,) = torch.autograd.grad(_one_by_one(xr, params), xr, dy)
    assert torch.equal(grad, expect)


def test_draws_are_in_range_and_flip_off_means_no_flip():
    g = torch.Generator().manual_seed(4)
    p = draw_jitter_flip(5000, 3, True, g)
    assert p.dtype == torch.int64 and p.shape == (5000, 3)
    assert set(p[:, 0].tolist()) == set(range(-3, 4)) == set(p[:, 1].tolist())
    assert set(p[:, 2].tolist()) == {0, 1} and 0.45 < p[:, 2].float().mean() < 0.55
    assert not draw_jitter_flip(100, 2, False, g)[:, 2].any()
    assert not draw_jitter_flip(100, 0, True, g)[:, :2].any()


def test_bad_input_is_refused():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        jitter_flip(x[0], torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        jitter_flip(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="int64"):
        jitter_flip(x, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="jitter must be >= 0"):
        draw_jitter_flip(2, -1, False)
    with pytest.raises(ValueError, match="jitter"):
        LossSettings(jitter=-1)


def test_the_step_feeds_the_teacher_jittered_images(digits_teacher, monkeypatch):
    """The teacher's input is exactly jitter_flip of the generators' images, with the step's own draws."""
    ens = small_ensemble(k=2, num_classes=10)
    t = trainer(digits_teacher, ens, jitter=3, flip=True)
    seen, drawn = [], []
    real_draw = t._draw_augment

    def spy_draw(k):
        out = real_draw(k)
        drawn.append(out)
        return out

    monkeypatch.setattr(t, "_draw_augment", spy_draw)
    handle = digits_teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        t.fit(1)
    finally:
        handle.remove()
    (params,) = drawn
    assert params.shape == (2 * 4, 3) and params[:, :2].abs().max() <= 3
    # the same step's images, un-augmented: replay the draw of latents from the trainer's stream
    plain = trainer(digits_teacher, small_ensemble(k=2, num_classes=10))
    raw = []
    handle = digits_teacher.register_forward_pre_hook(lambda m, args: raw.append(args[0].detach().clone()))
    try:
        plain.fit(1)
    finally:
        handle.remove()
    assert torch.equal(seen[0], jitter_flip(raw[0], params))
    assert not torch.equal(seen[0], raw[0])


def test_off_draws_nothing_and_on_changes_the_run(digits_teacher):
    a = trainer(digits_teacher, small_ensemble(k=2, num_classes=10))
    state = a.rng.get_state()
    assert a._draw_augment(2) is None and torch.equal(a.rng.get_state(), state)  # the latents' stream untouched
    a.fit(3)
    c = trainer(digits_teacher, small_ensemble(k=2, num_classes=10), jitter=2)
    c.fit(3)
    assert [r["loss"] for r in a.history][1:] != [r["loss"] for r in c.history][1:]


@pytest.mark.parametrize("world", [2, 3])
def test_whole_steps_under_distributed_keep_their_rows_of_the_global_draw(digits_teacher, world):
    """Each rank draws the global step's jitter from the shared stream and keeps its generators' rows: the ranks'
    rows together are the one-process draw (as the latents are, in _draw)."""
    t = trainer(digits_teacher, small_ensemble(k=2, num_classes=10), jitter=3, flip=True)
    k, n = 2, t.batch_size
    start = t.rng.get_state()
    whole = draw_jitter_flip(k * world * n, 3, True, t.rng, t.device)
    parts = []
    for rank in range(world):
        t.rng.set_state(start)
        t._global_draw, t.dist = True, SimpleNamespace(world=world, rank=rank)
        parts.append(t._draw_augment(k))
    assert torch.equal(torch.cat(parts), whole)


def test_bad_settings_are_refused(digits_teacher):
    with pytest.raises(ValueError, match="smaller than the images"):
        trainer(digits_teacher, small_ensemble(k=2, num_classes=10), jitter=16)  # 16 px images
    with pytest.raises(TypeError, match="jitter must be an int"):
        draw_jitter_flip(4, True, False)
    with pytest.raises(ValueError, match="params on"):
        jitter_flip(torch.randn(2, 1, 4, 4, device="meta"), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("capture", list(CAPTURES))
def test_graphed_step_replays_fresh_draws(teacher, capture):  # noqa: F811 (the fixture)
    """Captured once, replayed with each step's own draws: bit for bit the eager run."""
    eager = _trainer(teacher, jitter=2, flip=True)
    eager.fit(6)
    graphed = _trainer(teacher, CAPTURES[capture], jitter=2, flip=True)
    with spy_graphs() as made:
        graphed.fit(6)
    assert len(made) == 1 and made[0].captured and made[0].calls == 6
    _assert_same(eager, graphed)
