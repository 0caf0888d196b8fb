"""The matcher's epilogue fusion (fastdfd.nn.epilogue): which chains it fuses, which it leaves, and that a
fused teacher is the unfused one (outputs, loss, input gradient) on every backend."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfd
from fastdfd import MomentMatcher
from fastdfd.models import create_model
from fastdfd.ops.dispatch import unavailable

from ..conftest import randomize_bn_stats, require_backend


def _bn(c):
    return nn.BatchNorm2d(c)


class Chains(nn.Module):
    """Every form the fusion recognises, one that it must leave (GELU), a residual add and ReLU, an activation
    module shared by two BN layers (EfficientNet's ``_swish``), and a BN whose output has two users."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bns = nn.ModuleList(_bn(8) for _ in range(10))
        self.relu = nn.ReLU(inplace=True)
        self.shared = nn.ReLU6()
        self.leaky = nn.LeakyReLU(0.3)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        b = self.bns
        x = self.relu(b[0](self.conv(x)))          # module
        x = F.leaky_relu(b[1](x), 0.2)             # functional with a slope
        x = b[2](x).relu()                         # method
        x = self.shared(b[3](x))                   # one ReLU6 module after two BN layers
        x = self.shared(b[4](x))
        x = F.silu(b[5](x))
        x = F.gelu(b[6](x))                        # not an epilogue the taps fuse
        y = b[7](x)
        x = F.relu(y + x)                          # residual and ReLU: b[7]'s output has one user, the add
        z = b[8](x)
        x = self.leaky(z) + z                      # two users
        x = F.hardtanh(b[9](x), 0.0, 6.0)          # relu6 as hardtanh
        return self.head(x.mean((2, 3)))


def _teacher(model, seed=0):
    model = randomize_bn_stats(model.eval(), seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    return require_backend(request.param, unavailable("moment_tap", request.param, torch.empty(0)))


def _run(teacher, x, fuse, backend):
    x = x.clone().requires_grad_(True)
    with fastdfd.backend(backend), MomentMatcher(teacher, fuse_epilogues=fuse) as m:
        out = teacher(x)
        loss = m.loss()
        (gx,) = torch.autograd.grad(out.square().sum() + loss, x)
        return out.detach(), loss.detach(), gx, m.fusion


def _handed_activations(teacher, x):
    """The activation each tap hands the kernels in one forward of the attached teacher (None: none;
    "+residual" when it hands a residual too)."""
    import fastdfd.nn.tap as tap_module

    handed, real = [], tap_module.moment_tap

    def spy(*args, **kwargs):
        name = args[-1] and args[-1].name
        handed.append(f"{name}+residual" if kwargs.get("residual") is not None else name)
        return real(*args, **kwargs)

    tap_module.moment_tap = spy
    try:
        teacher(x)
    finally:
        tap_module.moment_tap = real
    return handed


def test_recognised_chains_and_the_ones_left(backend):
    teacher = _teacher(Chains())
    x = torch.randn(4, 3, 6, 6)
    plain = teacher(x)
    with MomentMatcher(teacher):  # the fused graph runs: the kernels get the activations
        assert _handed_activations(teacher, x) == ["relu", "leaky_relu", "relu", "relu6", "relu6", "silu", None,
                                                   "relu+residual", None, "relu6"]
    out0, loss0, g0, _ = _run(teacher, x, False, backend)
    out1, loss1, g1, fusion = _run(teacher, x, True, backend)
    assert fusion.reason is None
    assert {k: (a.name, a.negative_slope) for k, a in fusion.fused.items()} == {
        "bns.0": ("relu", 0.0), "bns.1": ("leaky_relu", 0.2), "bns.2": ("relu", 0.0), "bns.3": ("relu6", 0.0),
        "bns.4": ("relu6", 0.0), "bns.5": ("silu", 0.0), "bns.7": ("relu", 0.0), "bns.9": ("relu6", 0.0)}
    assert fusion.residual == {"bns.7"}
    assert fusion.unfused == {"bns.6": "followed by gelu", "bns.8": "its output has 2 users"}
    torch.testing.assert_close(out1, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert (g1 - g0).abs().max() <= 1e-4 * g0.abs().max()
    # detached: the teacher's own forward and modules are back
    assert "forward" not in teacher.__dict__
    torch.testing.assert_close(teacher(x), plain)


def test_cifar_resnet_fuses_every_bn_relu_and_residual(backend):
    """Every BN of a CIFAR ResNet: the first of each block with its ReLU, the second with the block's residual
    add (the option-A shortcut, which the graph computes after the BN) and the ReLU after it."""
    teacher = _teacher(create_model("cifar_resnet20", num_classes=10), seed=1)
    x = torch.randn(4, 3, 32, 32)
    plain = teacher(x)
    out0, loss0, g0, _ = _run(teacher, x, False, backend)
    out1, loss1, g1, fusion = _run(teacher, x, True, backend)
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert sorted(fusion.fused) == sorted(["bn1"] + [f"{k}.bn{i}" for k in blocks for i in (1, 2)])
    assert fusion.residual == {f"{k}.bn2" for k in blocks}
    with MomentMatcher(teacher):
        handed = _handed_activations(teacher, x)
        assert handed.count("relu") == 10 and handed.count("relu+residual") == 9
    assert all(a.name == "relu" for a in fusion.fused.values())
    assert fusion.unfused == {}
    torch.testing.assert_close(out1, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    assert (g1 - g0).abs().max() <= 1e-4 * g0.abs().max()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), _bn(4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y * 2
        return y.mean((2, 3))


def test_an_untraceable_teacher_runs_unfused_and_says_why():
    teacher = _teacher(Untraceable())
    x = torch.randn(2, 3, 8, 8)
    with MomentMatcher(teacher) as m:
        out = teacher(x)
        assert m.fusion.fused == {} and "torch.fx could not trace Untraceable.forward" in m.fusion.reason
    torch.testing.assert_close(out, teacher(x))


def test_train_mode_runs_the_own_forward_with_the_activation_once():
    """While attached, ``teacher.train()`` changes the modes the graph baked in: the class's forward runs, and
    the taps then apply no epilogue (LeakyReLU twice would not be LeakyReLU)."""
    teacher = _teacher(Chains())
    x = torch.randn(4, 3, 6, 6)
    with MomentMatcher(teacher) as m:
        assert m.fusion.fused
        teacher.train()
        with torch.no_grad():
            out = teacher(x)
        teacher.eval()
        fused_out = teacher(x)
    ref = _teacher(Chains())
    ref.load_state_dict(teacher.state_dict())
    ref.train()
    with torch.no_grad():
        want = ref(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_out, teacher(x), rtol=1e-5, atol=1e-5)


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), _bn(4), nn.ReLU())
        self.bn, self.act = _bn(4), nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.block(x))).mean((2, 3))


def test_a_hooked_submodule_stays_whole_and_its_hook_fires():
    teacher = _teacher(Hooked())
    seen = []
    teacher.block.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with MomentMatcher(teacher) as m:
        teacher(torch.randn(2, 3, 8, 8))
        assert sorted(m.fusion.fused) == ["bn"]  # block.1 is inside the hooked module
    assert seen == [torch.Size([2, 4, 6, 6])]


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), _bn(4)

    def forward(self, x):
        return F.relu(self.bn(x)) + F.silu(self.bn(self.conv(x)))


def test_a_bn_called_twice_with_two_activations_is_left_alone():
    teacher = _teacher(SharedBN())
    x = torch.randn(2, 4, 5, 5)
    with MomentMatcher(teacher) as m:
        out = teacher(x)
        assert m.fusion.fused == {} and m.fusion.unfused == {"bn": "called more than once, with different epilogues"}
    torch.testing.assert_close(out, teacher(x))


def test_fusion_off_and_the_state_dict_unchanged():
    teacher = _teacher(Chains())
    keys = list(teacher.state_dict())
    with MomentMatcher(teacher, fuse_epilogues=False) as m:
        assert m.fusion.fused == {} and m.fusion.reason == "fuse_epilogues=False"
        assert "forward" not in teacher.__dict__
    with MomentMatcher(teacher) as m:
        assert list(teacher.state_dict()) == keys
        assert "activation=relu" in repr(teacher.bns[0])
    assert list(teacher.state_dict()) == keys


def test_a_timm_norm_act_layer_applies_its_act_in_the_taps_pass():
    """timm's BatchNormAct2d holds its act: the tap applies it in its pass when the drop is an identity, and
    leaves act and drop to run after it otherwise; either way the layer is the untapped one."""
    from ..zoo_standins import BatchNormAct2d

    fused, kept = BatchNormAct2d(4, act_layer=nn.SiLU), BatchNormAct2d(4, act_layer=nn.Hardswish)
    teacher = _teacher(nn.Sequential(nn.Conv2d(3, 4, 1), fused, nn.Conv2d(4, 4, 1), kept))
    x = torch.randn(3, 3, 5, 5)
    want = teacher(x)
    import fastdfd.nn.tap as tap_module

    handed = []
    real = tap_module.moment_tap

    def spy(*args, **kwargs):
        handed.append(args[-1] and args[-1].name)
        return real(*args, **kwargs)

    with MomentMatcher(teacher) as m:
        taps = [mod for mod in teacher.modules() if type(mod).__name__ == "BNTap"]
        assert [t.own_activation and t.own_activation.name for t in taps] == ["silu", None]
        tap_module.moment_tap = spy
        try:
            got = teacher(x)
        finally:
            tap_module.moment_tap = real
        m.loss()
    assert handed == ["silu", None]  # the silu layer's act went to the tap; the hardswish one ran after it
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class Optional_(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), _bn(4)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        return F.silu(self.bn(self.conv(x))).mean((2, 3))


def test_a_forward_with_optional_arguments_is_not_rewritten():
    teacher = _teacher(Optional_())
    x = torch.randn(2, 3, 4, 4)
    with MomentMatcher(teacher) as m:
        assert m.fusion.fused == {} and "optional, keyword or variable arguments" in m.fusion.reason
        out = teacher(x)
    torch.testing.assert_close(out, teacher(x))


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), _bn(4), nn.SiLU())
        self.act = nn.SiLU()
        self.bn = _bn(4)

    def forward(self, x):
        return self.act(self.bn(self.block(x))).mean((2, 3))


def test_a_submodule_called_alone_keeps_its_own_activation():
    """The taps apply their epilogues only inside the rewritten forward: teacher.block(x) is silu(bn(conv x))
    once, not silu twice."""
    teacher = _teacher(Blocks())
    x = torch.randn(2, 3, 4, 4)
    want = teacher.block(x)
    with MomentMatcher(teacher) as m:
        assert sorted(m.fusion.fused) == ["block.1", "bn"]
        teacher(x)
        got = teacher.block(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_hooked_activation_module_is_not_fused_and_its_hook_fires():
    teacher = _teacher(Blocks())
    seen = []
    teacher.act.register_forward_hook(lambda mod, inp, out: seen.append("act"))
    with MomentMatcher(teacher) as m:
        assert "bn" not in m.fusion.fused and m.fusion.unfused["bn"] == "followed by call_module act"
        teacher(torch.randn(2, 3, 4, 4))
    assert seen == ["act"]


def test_a_hook_added_while_attached_makes_the_own_forward_run():
    teacher = _teacher(Blocks())
    x = torch.randn(2, 3, 4, 4)
    want = teacher(x)
    seen = []
    with MomentMatcher(teacher) as m:
        assert m.fusion.fused
        handle = teacher.block.register_forward_hook(lambda mod, inp, out: seen.append("block"))
        got = teacher(x)
        handle.remove()
    assert seen == ["block"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_deepcopy_while_attached_gives_an_independent_fused_teacher_and_pickling_is_refused():
    import copy
    import io

    teacher = _teacher(Blocks())
    x = torch.randn(2, 3, 4, 4)
    with MomentMatcher(teacher) as m:
        assert m.fusion.fused
        twin = copy.deepcopy(teacher)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(0.5)
        assert not torch.allclose(twin(x), teacher(x))  # the copy computes with its own parameters
        with pytest.raises(TypeError, match="cannot be pickled while its activations are fused"):
            torch.save(teacher, io.BytesIO())
    ref = _teacher(Blocks())
    ref.load_state_dict({k: v for k, v in twin.state_dict().items()})
    torch.testing.assert_close(twin(x), ref(x), rtol=1e-5, atol=1e-5)


def test_an_instance_forward_is_kept():
    teacher = _teacher(Blocks())
    marker = []

    def own(x):
        marker.append(1)
        return type(teacher).forward(teacher, x)

    teacher.forward = own
    with MomentMatcher(teacher) as m:
        assert m.fusion.fused == {} and "instance" in m.fusion.reason
        teacher(torch.randn(2, 3, 4, 4))
    assert teacher.forward is own and marker == [1]


class Counting(nn.Module):
    """A forward with Python state: a traced graph would freeze its branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.calls, self.double = nn.Conv2d(3, 4, 1), _bn(4), 0, False

    def forward(self, x):
        self.calls += 1
        y = F.relu(self.bn(self.conv(x)))
        return (2 * y if self.calls > 2 else y).mean((2, 3))


class Flagged(Blocks):
    def __init__(self):
        super().__init__()
        self.scale = False

    def forward(self, x):
        y = super().forward(x)
        return 3 * y if self.scale else y


def test_python_state_in_forward_is_never_frozen():
    """A forward that counts its calls is not rewritten (and the trace's own call is not counted); a flag that
    changes after the trace sends the call to the class's own forward."""
    teacher = _teacher(Counting())
    x = torch.randn(2, 3, 4, 4)
    with MomentMatcher(teacher) as m:
        assert m.fusion.fused == {} and "changes its modules' Python attributes" in m.fusion.reason
        assert teacher.calls == 0
        outs = [teacher(x) for _ in range(3)]
    torch.testing.assert_close(outs[2], 2 * outs[0])
    flagged = _teacher(Flagged())
    want = 3 * flagged(x)
    with MomentMatcher(flagged) as m:
        assert m.fusion.fused and "relu" not in str(_handed_activations(flagged, x))  # Blocks: silu
        assert _handed_activations(flagged, x) == ["silu", "silu"]
        flagged.scale = True
        assert _handed_activations(flagged, x) == [None, None]  # the class's forward, unfused
        got = flagged(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class Residuals(nn.Module):
    """The residual adds the fusion takes (every spelling, the add alone, a residual computed after the BN and
    one that broadcasts at run time) and the ones it must leave."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bns = nn.ModuleList(_bn(8) for _ in range(10))
        self.map = nn.Parameter(torch.randn(1, 8, 1, 1))  # broadcasts: the tap falls back to BN, add, act

    def forward(self, x):
        b = self.bns
        x = self.conv(x)
        x = F.relu(x + b[0](x))                    # residual first
        y = b[1](x)
        y += x                                     # in place into the BN output
        x = F.relu(y)
        x = torch.add(b[2](x), x).relu()           # torch.add, method relu
        x = F.silu(b[3](x).add_(x))                # add_ into the BN output
        x = b[4](x) + x                            # the add alone (no activation after it)
        s = x * 0.5                                # computed after the BN below: the tap moves to the add
        z = b[5](x)
        x = F.relu(z + s * 2.0)
        x = F.relu(b[6](x) + self.map)             # broadcast residual
        x = F.relu(torch.add(b[7](x), x, alpha=2.0))   # alpha: left
        x = F.relu(b[8](x) + 1.0)                  # a constant: left
        w = x.clone()
        w.add_(b[9](x))                            # in place into the other operand: left
        return F.relu(w).mean((2, 3))


def test_residual_forms_are_fused_and_exact(backend):
    teacher = _teacher(Residuals())
    x = torch.randn(4, 3, 6, 6)
    plain = teacher(x)
    out0, loss0, g0, _ = _run(teacher, x, False, backend)
    out1, loss1, g1, fusion = _run(teacher, x, True, backend)
    assert fusion.residual == {f"bns.{i}" for i in range(7)}
    assert {k: a.name for k, a in fusion.fused.items()} == {
        "bns.0": "relu", "bns.1": "relu", "bns.2": "relu", "bns.3": "silu", "bns.4": "identity", "bns.5": "relu",
        "bns.6": "relu"}
    assert set(fusion.unfused) == {"bns.7", "bns.8", "bns.9"}
    with MomentMatcher(teacher):
        handed = _handed_activations(teacher, x)
    # bns.6's residual broadcasts: its tap runs BN alone, then the add and ReLU as torch ops
    assert handed == ["relu+residual", "relu+residual", "relu+residual", "silu+residual", "identity+residual",
                      "relu+residual", None, None, None, None]
    torch.testing.assert_close(out1, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert (g1 - g0).abs().max() <= 1e-4 * g0.abs().max()


def test_residual_gradients_reach_a_trained_block_input():
    """The residual's gradient (dy a'(u) from the tap's backward) reaches what made it: a generator's
    parameters upstream of a fused teacher get the unfused teacher's gradients."""
    require_backend("cpp", unavailable("moment_tap", "cpp", torch.empty(0)))
    teacher = _teacher(create_model("cifar_resnet20", num_classes=10), seed=2)
    head = nn.Conv2d(3, 3, 1)
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for fuse in (False, True):
        head.zero_grad()
        with fastdfd.backend("cpp"), MomentMatcher(teacher, fuse_epilogues=fuse) as m:
            out = teacher(head(x))
            (out.square().mean() + m.loss()).backward()
        grads.append(head.weight.grad.clone())
    assert (grads[1] - grads[0]).abs().max() <= 1e-4 * grads[0].abs().max()


def test_a_projection_shortcut_leaves_its_add_to_the_main_path():
    """``relu(bn2(h) + shortcut_bn(conv(x)))``: both BN outputs go to the add alone; the main path's bn2 (first
    in the graph) takes the add and the ReLU, the shortcut's BN stays a plain tap, and the outputs are exact."""
    teacher = _teacher(create_model("resnet18", num_classes=10), seed=3)
    x = torch.randn(2, 3, 32, 32)
    plain = teacher(x)
    out0, loss0, g0, _ = _run(teacher, x, False, "torch")
    out1, loss1, g1, fusion = _run(teacher, x, True, "torch")
    assert fusion.reason is None
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    assert fusion.residual == {f"{k}.bn2" for k in blocks}
    shortcuts = [f"layer{s}.0.shortcut.1" for s in (2, 3, 4)]
    assert {k: fusion.unfused[k] for k in shortcuts} == {k: f"its add is fused into {k[:8]}.bn2" for k in shortcuts}
    torch.testing.assert_close(out1, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out1, out0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    assert (g1 - g0).abs().max() <= 1e-4 * g0.abs().max()


class InPlaceBetween(nn.Module):
    """The BN's input is changed in place between the BN and the add: a tap moved to the add would read the
    changed input, so the add is left."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), _bn(4)

    def forward(self, x):
        h = self.conv(x)
        y = self.bn(h)
        r = torch.relu_(h)
        return F.relu(y + r).mean((2, 3))


def test_an_in_place_op_between_the_bn_and_its_add_keeps_the_add():
    teacher = _teacher(InPlaceBetween())
    x = torch.randn(2, 3, 5, 5)
    want = teacher(x)
    with MomentMatcher(teacher) as m:
        assert m.fusion.unfused == {"bn": "followed by add, after an in-place op"}
        got = teacher(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_hook_on_a_tap_that_takes_a_residual_makes_the_own_forward_run():
    """A pre-hook that replaces the tap's input would drop the residual: a hook added while attached sends the
    call to the class's forward (exact), and a layer hooked at attach takes no residual."""
    teacher = _teacher(create_model("cifar_resnet20", num_classes=10), seed=4)
    x = torch.randn(2, 3, 32, 32)
    want = teacher(x)
    with MomentMatcher(teacher) as m:
        assert "layer1.0.bn2" in m.fusion.residual
        tap = teacher.layer1[0].bn2
        handle = tap.register_forward_pre_hook(lambda mod, inp: inp[0] * 1.0)
        got = teacher(x)
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
