"""The method's added terms: the adversarial term and mode seeking in the generator loss, crop-and-flip
augmentation in distillation; exact values against direct computations, and bad settings refused."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastdfd import Distiller, GeneratorTrainer
from fastdfd.models import create_model
from fastdfd.nn.ensemble import ensemble_forward
from fastdfd.train.augment import mix_pairs, random_crop_flip
from fastdfd.train.losses import distillation_kl, mode_seeking

from ..conftest import randomize_bn_stats
from .test_trainer import small_ensemble, trainer


def test_per_image_kl_averages_to_the_batch_kl():
    s, t = torch.randn(7, 5), torch.randn(7, 5)
    per = distillation_kl(s, t, 3.0, reduction="none")
    assert per.shape == (7,) and torch.allclose(per.mean(), distillation_kl(s, t, 3.0))
    expect = (F.softmax(t / 3, 1) * (F.log_softmax(t / 3, 1) - F.log_softmax(s / 3, 1))).sum(1) * 9
    assert torch.allclose(per, expect, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        distillation_kl(s, t, 1.0, reduction="sum")


def test_mode_seeking_is_latent_distance_over_image_distance():
    x, z = torch.randn(2, 5, 3, 4, 4), torch.randn(2, 5, 6)
    out = mode_seeking(x, z)  # 5 images: pairs (0, 2), (1, 3); the fifth is left out
    for k in range(2):
        ratios = [(z[k, i] - z[k, i + 2]).abs().mean() / ((x[k, i] - x[k, i + 2]).abs().mean() + 1e-5)
                  for i in range(2)]
        assert out[k] == pytest.approx(float(sum(ratios) / 2), rel=1e-6)
    collapsed = x[:, :1].expand(2, 5, 3, 4, 4)
    assert (mode_seeking(collapsed, z) > 1e4).all()  # one image for every latent: the term is at its largest
    with pytest.raises(ValueError, match="no pair"):
        mode_seeking(x[:, :1], z[:, :1])


def _objective(t, z, y, local):
    with t._run() as matcher:
        total, *_ = t.objective(t.ensemble.stacked(), z, y, local, matcher)
    return total


def test_adversarial_and_mode_seeking_terms_enter_the_loss_exactly(digits_teacher):
    student = randomize_bn_stats(create_model("digits_student", num_classes=10), seed=3)
    student.train()
    before = copy.deepcopy(student.state_dict())
    ens = small_ensemble(k=2, num_classes=10)
    plain = trainer(digits_teacher, ens, scope="generator")
    adv = trainer(digits_teacher, ens, scope="generator", adversarial_weight=0.7, diversity_weight=0.3,
                  student=student)
    z, y, local = ens.draw(4, None, torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = adv.input_space.from_generator(ensemble_forward(ens.stacked(), ens.spec, z, local).flatten(0, 1))
        student.eval()
        kl = distillation_kl(student(x), digits_teacher.eval()(x), 1.0, reduction="none").view(2, 4).mean(1)
        student.train()
        ms = mode_seeking(ensemble_forward(ens.stacked(), ens.spec, z, local), z)
    got = _objective(adv, z, y, local)
    want = _objective(plain, z, y, local) - 0.7 * kl.sum() + 0.3 * ms.sum()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert adv.config()["adversarial_weight"] == 0.7 and adv.config()["diversity_weight"] == 0.3
    assert "adversarial_weight" not in plain.config()
    # a step trains the generators only: the student's weights and BN statistics are untouched, its mode restored
    adv.fit(2)
    assert student.training
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.requires_grad for p in student.parameters())


class _HalfWrong(torch.nn.Module):
    """A student close to the teacher that gets every second image's top class wrong (its logits rolled by one
    class there): a fixed mix of agreeing and disagreeing images, where random networks agree on all or none."""

    def __init__(self, teacher):
        super().__init__()
        self.net = copy.deepcopy(teacher)
        with torch.no_grad():
            for p in self.net.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def forward(self, x):
        out = self.net(x)
        odd = (torch.arange(len(x)) % 2 == 1)[:, None]
        return torch.where(odd, out.roll(1, dims=1), out)


def test_masked_adversarial_term_counts_only_images_the_student_still_agrees_on(digits_teacher):
    student = _HalfWrong(digits_teacher)
    ens = small_ensemble(k=3, num_classes=10)
    plain = trainer(digits_teacher, ens, scope="generator")
    masked = trainer(digits_teacher, ens, scope="generator", adversarial_weight=0.5, adversarial_mask=True,
                     student=student)
    z, y, local = ens.draw(8, None, torch.Generator().manual_seed(6))
    with torch.no_grad():
        x = masked.input_space.from_generator(ensemble_forward(ens.stacked(), ens.spec, z, local).flatten(0, 1))
        s, t = student.eval()(x), digits_teacher.eval()(x)
        agree = s.argmax(1) == t.argmax(1)
        kl = distillation_kl(s, t, 1.0, reduction="none")
    # the case the mask exists for: some images agree and some do not, else it would be all or nothing
    assert 0 < int(agree.sum()) < agree.numel()
    want = _objective(plain, z, y, local) - 0.5 * (kl * agree).view(3, 8).mean(1).sum()
    assert float(_objective(masked, z, y, local).detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert masked.config()["adversarial_mask"] is True and "adversarial_mask" not in plain.config()
    masked.fit(1)  # a step runs with the mask (its value is what the objective above checks)


def test_bad_method_settings_are_refused(digits_teacher):
    ens = small_ensemble()
    with pytest.raises(ValueError, match="needs the student"):
        trainer(digits_teacher, ens, adversarial_weight=1.0)
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        trainer(digits_teacher, ens, diversity_weight=1.0, batch_size=1)
    with pytest.raises(ValueError, match="at least 0"):
        trainer(digits_teacher, ens, diversity_weight=-1.0)
    with pytest.raises(ValueError, match="is the teacher itself"):
        trainer(digits_teacher, ens, adversarial_weight=1.0, student=digits_teacher)
    with pytest.raises(ValueError, match="augment = .mixup.: expected one of none, crop_flip"):
        Distiller(digits_teacher, create_model("digits_student", num_classes=10), ens, augment="mixup", progress=False)


def test_random_crop_flip_is_a_per_image_padded_crop_and_flip():
    x = torch.randn(40, 3, 9, 7, dtype=torch.float64)
    y = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same draws, in the same order
    dy, dx = (torch.randint(0, 5, (40, 1, 1), generator=g) for _ in range(2))
    flip = torch.rand(40, 1, 1, generator=g) < 0.5
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(40):
        crop = padded[i, :, dy[i, 0, 0]:dy[i, 0, 0] + 9, dx[i, 0, 0]:dx[i, 0, 0] + 7]
        assert torch.equal(y[i], crop.flip(-1) if flip[i] else crop), i
    unpadded = random_crop_flip(x, 0, torch.Generator().manual_seed(1))  # no padding: flips only, nothing lost
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(unpadded, x))
    with pytest.raises(ValueError, match="N, C, H, W"):
        random_crop_flip(x[0], 1)


def test_distiller_augments_with_black_padding_and_resumes_in_its_config(digits_teacher):
    ens = small_ensemble(k=2, num_classes=10)
    student = create_model("digits_student", num_classes=10)
    d = Distiller(digits_teacher, student, ens, batch_size=4, augment="crop_flip", progress=False,
                  input_space="minus_one_one")
    assert d.config()["augment"] == "crop_flip"
    seen = []
    hook = digits_teacher.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    try:
        d.fit(1)
    finally:
        hook.remove()
    # [-1, 1] input space: black pixels are -1; a crop of 2 px padding at 16 px shows some padded border
    x = seen[0]
    assert x.min() >= -1 - 1e-6 and bool((x == -1).any())
    assert "augment" not in Distiller(digits_teacher, copy.deepcopy(student), ens, progress=False).config()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixup_blends_each_image_with_its_partner_by_a_uniform_share(dtype):
    x = torch.randn(37, 3, 5, 7, dtype=dtype)
    y = mix_pairs(x, "mixup", torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same draws, in the same order
    perm = torch.randperm(37, generator=g)
    share = torch.rand(37, generator=g).to(dtype).view(37, 1, 1, 1)
    assert y.dtype == dtype and torch.allclose(y, share * x + (1 - share) * x[perm], rtol=0, atol=1e-6)
    assert mix_pairs(x, "none") is x


def test_cutmix_pastes_one_clipped_box_of_the_partner_of_sides_sqrt_of_its_share():
    n, h, w = 300, 9, 12
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, h, w).contiguous()  # image i is all i
    y = mix_pairs(x, "cutmix", torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(n, generator=g)
    share = torch.rand(n, generator=g)
    pasted = y[:, 0] != x[:, 0]  # [N, H, W]
    for i in range(n):
        if perm[i] == i:
            continue  # its own partner: nothing visible changes
        assert torch.equal(y[i, 0], y[i, 1])  # every channel alike
        assert set(y[i].unique().tolist()) <= {float(i), float(perm[i])}
        rows, cols = pasted[i].any(1), pasted[i].any(0)
        box = rows.view(h, 1) & cols.view(1, w)
        assert torch.equal(pasted[i], box), i  # one axis-aligned box
        for line in (rows, cols):  # each a single run of pixels
            on = torch.nonzero(line)[:, 0]
            assert len(on) == 0 or on[-1] - on[0] + 1 == len(on)
        side = (1 - share[i]).sqrt()  # of the box, in units of the image's side: a run covers at most one more pixel
        assert rows.sum() <= side * h + 1 and cols.sum() <= side * w + 1
    area = pasted.float().mean((1, 2))
    assert 0.2 < area.mean() < 0.5  # about E[1 - l] = 1/2, less what the border clips
    with pytest.raises(ValueError, match="expected one of none, mixup, cutmix"):
        mix_pairs(x, "blend")
    with pytest.raises(ValueError, match="N, C, H, W"):
        mix_pairs(x[0], "cutmix")


@pytest.mark.parametrize("from_pool", [False, True])
def test_distiller_mixes_and_the_teacher_labels_what_the_student_sees(digits_teacher, from_pool):
    from fastdfd.train.pool import ImagePool

    ens = small_ensemble(k=2, num_classes=10)
    pool = None
    if from_pool:
        pool = ImagePool(64)
        trainer(digits_teacher, ens, pool=pool).fit(2)
    student = create_model("digits_student", num_classes=10)
    d = Distiller(digits_teacher, student, ens, batch_size=4, pool=pool, progress=False, mix="cutmix",
                  augment="crop_flip", input_space="minus_one_one", log_every=1, temperature=3.0)
    assert d.config()["mix"] == "cutmix"
    seen_t, seen_s = [], []
    hooks = [digits_teacher.register_forward_hook(lambda _m, a, out: seen_t.append((a[0].clone(), out.clone()))),
             student.register_forward_hook(lambda _m, a, out: seen_s.append((a[0].clone(), out.detach().clone())))]
    try:
        rows = d.fit(3)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen_t) == len(seen_s) == len(rows) == 3  # one teacher forward a step, from the pool too
    for (xt, t_out), (xs, s_out), row in zip(seen_t, seen_s, rows):
        assert torch.equal(xt, xs)
        # the loss is taken against the teacher's logits on the mixed image, not the pool's stored ones
        assert row["kd"] == pytest.approx(distillation_kl(s_out, t_out, 3.0).item(), rel=1e-5)
    if from_pool:  # some image of each step is a mix, found in no row of the pool
        stored = pool.images[: len(pool)].flatten(1)
        assert all((torch.cdist(xs.flatten(1), stored).min(1).values > 1e-6).any() for xs, _ in seen_s)
    with pytest.raises(ValueError, match="mix = .blend.: expected one of none, mixup, cutmix"):
        Distiller(digits_teacher, student, ens, mix="blend", progress=False)
    assert "mix" not in Distiller(digits_teacher, copy.deepcopy(student), ens, progress=False).config()


# ------------------------------------------------------------------ the image pool
def test_image_pool_is_a_ring_buffer_of_the_newest_rows():
    from fastdfd.train.pool import ImagePool

    pool = ImagePool(5)
    with pytest.raises(RuntimeError, match="empty"):
        pool.draw(1)
    x = torch.arange(7.0).view(7, 1, 1, 1).expand(7, 2, 3, 3)
    logits = torch.arange(7.0).view(7, 1).expand(7, 4)
    pool.push(x[:3], logits[:3])
    assert len(pool) == 3 and pool.images[:3, 0, 0, 0].tolist() == [0, 1, 2]
    pool.push(x[3:7], logits[3:7])  # wraps: rows 5 and 6 overwrite 0 and 1
    assert len(pool) == 5 and pool.pushed == 7 and pool.images[:, 0, 0, 0].tolist() == [5, 6, 2, 3, 4]
    assert torch.equal(pool.images[:, 0, 0, 0], pool.logits[:, 0])  # rows stay paired
    pool.push(x, logits)  # more than the capacity at once: the newest 5
    assert sorted(pool.images[:, 0, 0, 0].tolist()) == [2, 3, 4, 5, 6]
    images, drawn = pool.draw(50, torch.Generator().manual_seed(0))
    assert images.shape == (50, 2, 3, 3) and torch.equal(images[:, 0, 0, 0], drawn[:, 0])
    assert set(drawn[:, 0].tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}
    with pytest.raises(ValueError, match="pool holds images"):
        pool.push(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="capacity must be positive"):
        ImagePool(0)


def test_trainer_fills_the_pool_and_the_distiller_learns_from_it_without_the_teacher(digits_teacher):
    from fastdfd.train.pool import ImagePool

    ens = small_ensemble(k=2, num_classes=10)
    pool = ImagePool(100)
    seen = []
    hook = digits_teacher.register_forward_hook(lambda _m, a, out: seen.append((a[0].detach(), out.detach())))
    try:
        t = trainer(digits_teacher, ens, pool=pool)
        t.fit(3)
    finally:
        hook.remove()
    steps = seen[-3:]  # the probe's forward came first
    assert len(pool) == 3 * 2 * 4 and pool.pushed == 24
    assert torch.equal(pool.images[:24], torch.cat([x for x, _ in steps]))
    assert torch.equal(pool.logits[:24], torch.cat([y for _, y in steps]).float())
    assert "pool" in GeneratorTrainer(digits_teacher, ens, pool=ImagePool(8), cuda_graph="auto",
                                      progress=False).graph_refusal
    student = create_model("digits_student", num_classes=10)
    d = Distiller(digits_teacher, student, ens, batch_size=3, pool=pool, progress=False, log_every=1,
                  input_space="minus_one_one", augment="crop_flip")
    calls = []
    hook = digits_teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        rows = d.fit(4)
    finally:
        hook.remove()
    assert not calls and len(rows) == 4 and d.config()["pool"] == 100
    assert all(r["kd"] >= 0 for r in rows)

