"""The distiller's labels from a BN-folded copy of the teacher (fastdfd.train.labeller): the copy against the
float64 teacher, what makes it follow the teacher, the teachers it must leave alone, and the distiller's use."""

import copy
import warnings

import pytest
import torch
from torch import nn

from fastdfd import Distiller
from fastdfd.models import create_model
from fastdfd.settings import DistillSettings
from fastdfd.train.labeller import TeacherLabeller, fold_batchnorms

from ..conftest import randomize_bn_stats
from .test_trainer import small_ensemble


def _cifar_teacher(seed=0):
    torch.manual_seed(seed)
    return randomize_bn_stats(create_model("cifar_resnet20", num_classes=10)).eval().requires_grad_(False)


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("shape", [(7, 3, 32, 32), (2, 3, 19, 23), (1, 3, 8, 8)])
def test_folded_copy_is_within_fp32_rounding_of_the_float64_teacher(shape):
    teacher = _cifar_teacher()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(teacher).double()(x.double())
    labeller = TeacherLabeller(teacher)
    got = labeller(x)
    assert labeller.folded and labeller.reason == ""
    assert not got.requires_grad
    plain = teacher(x)
    # the copy's error against float64 is of the size of the plain fp32 teacher's (folding rounds the weights once)
    assert _rel(got, reference) <= 10 * _rel(plain, reference) + 1e-6
    assert _rel(got, reference) < 1e-4


def test_every_conv_bn_pair_is_folded_and_cpu_weights_are_channels_last():
    teacher = _cifar_teacher()
    folded, reason = fold_batchnorms(teacher, channels_last=True)
    assert reason == ""
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # every BN follows a conv alone
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert all(m.bias is not None for m in convs)  # the BN's shift lives in the bias
    # the teacher itself is untouched: its BN layers, contiguous weights
    assert sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()) == len(convs)
    assert all(m.weight.is_contiguous() for m in teacher.modules() if isinstance(m, nn.Conv2d))


def test_the_copy_follows_the_teachers_weights_modules_modes_and_hooks():
    teacher = _cifar_teacher()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labeller = TeacherLabeller(teacher)
    labeller(x)
    first = labeller._copy
    labeller(x)
    assert labeller._copy is first  # nothing changed: the copy is kept, not traced again
    bn = next(m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_var.data.mul_(4.0)  # through .data: no version counter sees it, the bytes do
    assert torch.allclose(labeller(x), teacher(x), atol=1e-4) and labeller._copy is not first
    with torch.no_grad():
        bn.weight = nn.Parameter(bn.weight * 0.5, requires_grad=False)  # replaced
    assert torch.allclose(labeller(x), teacher(x), atol=1e-4) and labeller.folded
    seen = []
    handle = bn.register_forward_hook(lambda *_: seen.append(1))
    with pytest.warns(UserWarning, match="carries hooks"):
        labeller(x)
    assert seen and not labeller.folded and "hooks" in labeller.reason  # the hook is called, so no copy
    handle.remove()
    labeller(x)
    assert labeller.folded
    teacher.train()
    out = labeller(x)
    assert not labeller.folded and "training mode" in labeller.reason
    assert torch.equal(out, teacher(x))  # answered by the teacher (in eval its BN would differ)
    teacher.eval()


def test_a_swapped_module_and_a_changed_attribute_are_seen():
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    teacher(x)  # materialise the lazy layer
    teacher = randomize_bn_stats(teacher).eval()
    labeller = TeacherLabeller(teacher)
    labeller(x)
    assert labeller.folded
    teacher[2] = nn.Tanh().eval()  # no tensor changes: the module's identity and type do
    assert torch.allclose(labeller(x), teacher(x), atol=1e-5) and labeller.folded
    teacher[2].inplace = True  # a plain attribute a forward may read
    first = labeller._copy
    labeller(x)
    assert labeller._copy is not first


def test_inside_held_the_teacher_is_checked_on_the_first_call_only():
    teacher = _cifar_teacher()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labeller = TeacherLabeller(teacher)
    with labeller.held():
        labeller(x)
        first = labeller._copy
        with torch.no_grad():
            next(teacher.parameters()).mul_(2.0)  # a distiller's fit never does this: not looked for inside
        labeller(x)
        assert labeller._copy is first
    assert torch.allclose(labeller(x), teacher(x), atol=1e-4) and labeller._copy is not first  # outside: seen
    with labeller.held():
        second = labeller._copy
        with torch.no_grad():
            next(teacher.parameters()).mul_(0.5)
        assert torch.allclose(labeller(x), teacher(x), atol=1e-4) and labeller._copy is not second  # first call


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h.relu()
        return self.fc(h.mean((2, 3)))


class _OptionalArgument(_Untraceable):
    def forward(self, x, scale=None):  # a trace would make scale a Proxy and fix the branch taken
        h = self.bn(self.conv(x))
        return self.fc((h if scale is None else h * scale).mean((2, 3)))


class _Flattens(nn.Module):
    """LeNet's flatten by .view, which channels_last activations refuse: the copy runs in the teacher's layout."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().view(x.shape[0], -1))


class _SharedConv(nn.Module):
    """One convolution called at two sites, a BN after one of them: torch.fx's fold changes the module, and
    so both calls. Only the probe can see it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        return self.fc((self.bn(self.conv(x)) + self.conv(x)).mean((2, 3)))


class _PreActivation(nn.Module):
    """BN before the convolution, and a BN whose convolution also feeds a skip: neither may be folded."""

    def __init__(self):
        super().__init__()
        self.bn0, self.conv0 = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.conv0(self.bn0(x))
        c = self.conv1(h)
        return self.fc((self.bn1(c) + c).mean((2, 3)))


@pytest.mark.parametrize("make, why", [
    (_Untraceable, "could not be copied and traced by torch.fx"),
    (_OptionalArgument, "optional, keyword or variable arguments"),
    (_SharedConv, "differs from the teacher's"),
])
def test_teachers_it_cannot_fold_answer_as_they_are(make, why):
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    teacher = randomize_bn_stats(make()).eval()
    labeller = TeacherLabeller(teacher)
    with pytest.warns(UserWarning, match=why):
        assert torch.equal(labeller(x), teacher(x))
    assert not labeller.folded and why in labeller.reason


def test_a_forward_on_the_instance_or_the_switch_off_keep_the_teacher():
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    own = randomize_bn_stats(_PreActivation()).eval()
    own.forward = own.forward  # a forward on the instance
    labeller = TeacherLabeller(own)
    with pytest.warns(UserWarning, match="forward of its own"):
        assert torch.equal(labeller(x), own(x))
    off = TeacherLabeller(_cifar_teacher(), enabled=False)
    assert torch.equal(off(torch.ones(1, 3, 32, 32)), off.teacher(torch.ones(1, 3, 32, 32)))
    assert not off.folded and off.reason == "fold_teacher is off"


def test_a_view_in_the_forward_gets_a_copy_in_the_teachers_layout():
    teacher = randomize_bn_stats(_Flattens()).eval()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    labeller = TeacherLabeller(teacher)
    assert torch.allclose(labeller(x), teacher(x), atol=1e-5)
    assert labeller.folded and not labeller._channels_last


def test_an_inference_mode_teacher_is_labelled():
    with torch.inference_mode():
        teacher = randomize_bn_stats(_PreActivation()).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    labeller = TeacherLabeller(teacher)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # folded or, with the reason, not: either way the teacher's answer
        got = labeller(x)
    with torch.inference_mode():
        assert torch.allclose(got, teacher(x), atol=1e-5)


def test_a_bn_that_cannot_fold_is_kept():
    teacher = randomize_bn_stats(_PreActivation()).eval()
    folded, reason = fold_batchnorms(teacher)
    assert reason == ""
    kept = {type(m) for m in folded.modules()}
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 2  # bn0 before a conv, bn1 beside c
    assert nn.Conv2d in kept
    x = torch.randn(5, 3, 9, 7, generator=torch.Generator().manual_seed(4))
    labeller = TeacherLabeller(teacher)
    assert torch.allclose(labeller(x), teacher(x), atol=1e-5) and labeller.folded


def test_fold_refuses_a_teacher_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms(create_model("cifar_resnet20", num_classes=10).train())


@pytest.mark.parametrize("from_pool", [False, True])
def test_distiller_labels_with_the_folded_copy_and_learns_as_with_the_teacher(from_pool):
    from fastdfd.train.pool import ImagePool

    from .test_trainer import trainer

    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    n_bn, mode = sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()), teacher.training
    ens = small_ensemble(k=2, num_classes=10)
    pool = None
    if from_pool:
        pool = ImagePool(64)
        trainer(teacher, ens, pool=pool).fit(2)
    runs = {}
    for fold in (True, False):
        torch.manual_seed(5)
        student = create_model("digits_student", num_classes=10)
        d = Distiller(teacher, student, ens, batch_size=4, pool=copy.deepcopy(pool), progress=False,
                      mix="cutmix", input_space="minus_one_one", log_every=1, seed=7, fold_teacher=fold)
        runs[fold] = (d.fit(3), d)
        assert "fold_teacher" not in d.config()  # rounding only: not part of what a checkpoint must match
    assert runs[True][1].labeller.folded and not runs[False][1].labeller.folded
    for a, b in zip(runs[True][0], runs[False][0]):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4, abs=1e-6)
    # the teacher leaves the runs as it came in: its BN layers, mode and weights
    assert sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()) == n_bn and teacher.training == mode
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_channels_last_student_learns_as_the_contiguous_one_and_leaves_its_format():
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
    ens = small_ensemble(k=2, num_classes=10)
    runs = {}
    for cl in (False, True):
        torch.manual_seed(6)
        student = create_model("digits_student", num_classes=10)
        params = list(student.parameters())
        d = Distiller(teacher, student, ens, batch_size=4, progress=False, augment="crop_flip", mix="cutmix",
                      input_space="minus_one_one", log_every=1, seed=8, channels_last=cl)
        seen = []
        # a weight whose layouts differ (one input channel would be both); the images have one channel, so any
        # layout reads as channels_last: the weight alone tells
        weight = next(p for p in student.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
        handle = student.register_forward_pre_hook(
            lambda m, a: seen.append(weight.is_contiguous(memory_format=torch.channels_last)
                                     and not weight.is_contiguous()))
        rows = d.fit(2) + d.fit(2)  # two fits: the format goes in and out twice, the optimiser's state stays
        handle.remove()
        assert seen and all(seen) == cl and any(seen) == cl
        # after the fits: the same Parameter objects (the optimiser's), contiguous, with the trained values
        assert all(p is q for p, q in zip(student.parameters(), params))
        assert all(p.is_contiguous() for p in student.parameters())
        runs[cl] = (rows, student.state_dict())
    for a, b in zip(runs[False][0], runs[True][0]):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4, abs=1e-6)
    for k, v in runs[False][1].items():
        assert torch.allclose(v.float(), runs[True][1][k].float(), rtol=1e-4, atol=1e-5), k


def test_layout_knobs_default_and_stay_out_of_a_checkpoints_config():
    from fastdfd.settings import DistillSettings

    assert DistillSettings().channels_last is False and DistillSettings().fold_teacher is True
    assert "channels_last" not in DistillSettings(channels_last=True).config()
    assert "fold_teacher" not in DistillSettings(fold_teacher=False).config()


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_copy_outlives_the_generators_turns(channels_last):
    """In turns, the generator trainer taps the teacher (and may convert its weights) between two fits of the
    distiller: the teacher comes back as it was, so the copy is not traced again."""
    from fastdfd.train.pool import ImagePool

    from .test_trainer import trainer

    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
    ens = small_ensemble(k=2, num_classes=10)
    pool = ImagePool(64)
    gen = trainer(teacher, ens, pool=pool, channels_last=channels_last)
    gen.fit(1)
    d = Distiller(teacher, create_model("digits_student", num_classes=10), ens, batch_size=4, pool=pool,
                  progress=False, mix="cutmix", input_space="minus_one_one", log_every=1)
    d.fit(1)
    first = d.labeller._copy
    assert first is not None
    gen.fit(2)
    d.fit(1)
    assert d.labeller._copy is first


@pytest.mark.filterwarnings("ignore:fastdfd.*bf16 autocast on a CPU without:UserWarning")  # asked for here
@pytest.mark.parametrize("fold", [True, False])
def test_bf16_labels_are_fp32_within_bf16_rounding_of_the_float64_teacher(fold):
    """DistillSettings.autocast: the answering forward runs in bf16 (its output differs from the fp32 one), the
    logits come back fp32, within bf16's rounding of the float64 teacher; the fold's fp32 check still passes."""
    teacher = _cifar_teacher()
    x = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(teacher).double()(x.double())
    fp32 = TeacherLabeller(teacher, enabled=fold)(x)
    labeller = TeacherLabeller(teacher, enabled=fold, autocast=True)
    probe, probed_under_autocast = labeller._probe, []

    def recording_probe(*args):
        probed_under_autocast.append(torch.is_autocast_enabled("cpu"))
        return probe(*args)

    labeller._probe = recording_probe
    got = labeller(x)
    assert probed_under_autocast == ([False] if fold else [])  # the fold is checked in fp32
    assert labeller.folded == fold and labeller.reason == ("" if fold else "fold_teacher is off")
    assert got.dtype == torch.float32 and not got.requires_grad and got.shape == reference.shape
    assert not torch.equal(got, fp32)  # bf16 did run
    assert _rel(got, reference) < 5e-2  # bf16 keeps 8 bits of mantissa; 20 layers of it
    assert _rel(fp32, reference) < 1e-4


@pytest.mark.filterwarnings("ignore:fastdfd.*bf16 autocast on a CPU without:UserWarning")  # asked for here
def test_distiller_with_bf16_labels_learns_as_with_fp32_ones():
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
    ens = small_ensemble(k=2, num_classes=10)
    runs = {}
    for bf16 in (False, True):
        torch.manual_seed(9)
        student = create_model("digits_student", num_classes=10)
        d = Distiller(teacher, student, ens, batch_size=4, progress=False, mix="cutmix",
                      input_space="minus_one_one", log_every=1, seed=3, autocast=bf16)
        runs[bf16] = d.fit(3)
        assert d.labeller.autocast == bf16 and d.labeller.folded
        assert "autocast" not in d.config()  # rounding only: not part of what a checkpoint must match
    for a, b in zip(runs[False], runs[True]):
        assert a["kd"] == pytest.approx(b["kd"], rel=5e-2, abs=1e-4)
    assert any(a["kd"] != b["kd"] for a, b in zip(runs[False], runs[True]))  # the labels did run in bf16
    assert DistillSettings().autocast is False  # off unless asked: bf16 is slower on a CPU without bf16 units
