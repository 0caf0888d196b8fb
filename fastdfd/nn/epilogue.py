"""Finding the activation (and the residual add) after each BN layer of a teacher, so that the tap applies
them in its own pass.

The three teachers of the whole-step benchmark apply their activations as modules or functionals called
from their own ``forward`` (``self.relu1(self.bn1(...))`` and ``self.relu2(self.bn2(...) + self.shortcut(x))``
in the CIFAR ResNets, ``self._swish(self._bn0(...))`` with one ReLU6 module called after two BN layers in
EfficientNet-Lite, ``F.relu`` elsewhere): no module structure shows which activation follows which BN. So the
teacher is traced once with ``torch.fx`` when a :class:`~fastdfd.nn.MomentMatcher` attaches, the taps standing
in as leaves:

- a tap whose output has exactly one user, and that user is a recognised activation of it alone
  (:func:`activation_of`), takes that activation as its epilogue (``BNTap.activation``: ``moment_tap``'s
  ``activation``), and the activation's node leaves the graph, its users reading the tap's output instead;
- a tap whose output has exactly one user, and that user adds another tensor to it (:func:`residual_of`: a
  basic block's ``bn2(...) + shortcut``), takes the add, and the activation after it when the sum's only
  user is one (``a(BN(x) + r)``, ``moment_tap``'s ``residual``); the tap node moves down to the add's place,
  since the graph may compute the residual after the BN (the CIFAR block's shortcut), and reads it as a
  second input. At run time a residual that does not match x exactly (broadcasting, another dtype) is added
  after the tap, as the teacher's forward did;
- the teacher's ``forward`` is replaced, on the instance and while the matcher is attached, by the rewritten
  graph's (same submodule objects, same parameters: ``state_dict``, ``.to()`` and the BN swap are unchanged).

What stays unfused, and why (each is exact: the activation runs as its own op, as without a matcher):

- a teacher ``torch.fx`` cannot trace (data-dependent control flow, ``*args`` forwards, ...): the whole teacher
  (:attr:`Fusion.reason` says why);
- a BN output used twice (a skip taken from the BN output itself), an activation that is not one of
  ``ACTIVATIONS`` (GELU, Hardswish, ...), an add with ``alpha`` or of a constant, an in-place add into the
  other operand;
- the inside of any submodule that carries forward hooks (kept whole, so that the hooks fire).

The graph stands for the call and the modules as they were traced, so the class's own forward runs instead,
unfused, whenever they differ: a call with keyword arguments or another number of inputs, a plain Python
attribute changed on a module whose forward the graph inlined or on an activation module it took out (the
train/eval mode after ``teacher.train()``, a flag a ``forward`` branches on, a LeakyReLU's slope), a forward
hook or pre-hook added or removed on such a module, or a global module hook. (The other modules, convolutions
and taps among them, are called as they are and read their own state.) Not rewritten at all:
a forward that changes its modules' attributes itself (a call counter), one that takes optional or variable
arguments (which a trace would fix), and a teacher with an instance-level ``forward``. The taps apply their epilogues only
inside the rewritten forward, so a submodule called on its own keeps its own activations. A forward hook on a
fused BN layer sees a(BN(x) [+ r]), and a fused residual among its inputs. ``torch.fx`` traces ``a += b`` on
tensors as ``a = a + b`` (with or without fusion): a forward that relies on an in-place add changing another
alias of ``a`` is not one a traced graph stands for. Under bf16/fp16 autocast a'(z) is taken on the fp32 z:
within a rounding step of a kink (ReLU6's 6) the fused gradient may differ from the unfused one, which tests
the rounded output.
"""

from __future__ import annotations

import copy
import inspect
import operator
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as _module

from ..ops.moment.activation import Activation
from .flavours import module_activation
from .tap import BNTap

# Functions and methods recognised as an activation (modules: .flavours.module_activation).
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
              F.silu: "silu", F.leaky_relu: "leaky_relu", torch.nn.functional.hardtanh: "hardtanh"}
_METHODS = {"relu": "relu", "relu_": "relu"}
# keyword arguments that change nothing about the value (in-place is harmless: the tap's output has no
# other user)
_INPLACE = {"inplace"}


def _function_activation(name: str, args: tuple, kwargs: dict) -> Activation | None:
    """The activation of ``F.<name>(node, *args, **kwargs)``, or None when its arguments are not constants
    it supports."""
    extra = dict(kwargs)
    for key in _INPLACE:
        extra.pop(key, None)
    if name == "leaky_relu":
        slope = args[0] if args else extra.pop("negative_slope", 0.01)
        rest = args[1:]  # inplace, positionally
        if extra or not isinstance(slope, (int, float)) or any(not isinstance(a, bool) for a in rest):
            return None
        return Activation("leaky_relu", float(slope))
    if name == "hardtanh":
        lo = args[0] if args else extra.pop("min_val", -1.0)
        hi = args[1] if len(args) > 1 else extra.pop("max_val", 1.0)
        if extra or (lo, hi) != (0.0, 6.0) or any(not isinstance(a, bool) for a in args[2:]):
            return None
        return Activation("relu6")
    if extra or any(not isinstance(a, bool) for a in args):  # only inplace may follow
        return None
    return Activation(name)


def residual_of(node: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` adds a tensor to ``source`` (``source + r``, ``r + source``,
    ``torch.add(source, r)``, ``source += r``, ``source.add(r)``, ``source.add_(r)``), else None.

    Not taken: an add with ``alpha`` or other keywords, a constant operand (a scalar bias, not a residual),
    ``source + source``, and in-place adds into the other operand (``r.add_(source)`` changes ``r`` for its
    other users, which a fused tap would not do). (``torch.fx`` traces ``r += source`` on tensors as
    ``r = r + source``, in the graph with or without fusion.)"""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        other = b if a is source else a if b is source else None
    elif (node.op == "call_function" and node.target is operator.iadd) or (
            node.op == "call_method" and node.target in ("add", "add_")):
        other = b if a is source else None  # in place into source (its only user is this add), or source.add(r)
    else:
        return None
    if not isinstance(other, fx.Node) or other is source:
        return None
    return other


@dataclass(frozen=True)
class _Plan:
    """What one call of a tap takes over: the activation after it (identity: none) and, when it adds a
    residual first, the residual's node; ``erase`` are the nodes it replaces, last user first."""

    activation: Activation
    residual: fx.Node | None
    erase: tuple[fx.Node, ...]

    @property
    def key(self) -> tuple:  # what every call of one tap must agree on
        return self.activation, self.residual is not None


def _in_place(node: fx.Node, root: nn.Module, keep: set[int]) -> bool:
    """Whether ``node`` may write a tensor in place: an in-place method or function (``relu_``, ``add_``,
    ``inplace=True``), a module with ``inplace=True``, or a module kept whole (its forward is not seen)."""
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return (getattr(node.target, "__name__", "").endswith("_") or node.target is operator.iadd
                or node.kwargs.get("inplace") is True or any(a is True for a in node.args[1:]))
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return getattr(module, "inplace", False) is True or id(module) in keep
    return False


def _movable(node: fx.Node, to: fx.Node, root: nn.Module, keep: set[int]) -> bool:
    """Whether the tap call ``node`` can run at ``to``'s place instead (reading its input there): no node in
    between writes anything in place, so its input (or an alias of it) is what it was."""
    n = node.next
    while n is not to:
        if _in_place(n, root, keep):
            return False
        n = n.next
    return True


def _plan(node: fx.Node, root: nn.Module, keep: set[int]) -> tuple["_Plan | None", str]:
    """The epilogue to fuse into the tap call ``node`` (whose output has exactly one user), or None and why
    not: an activation of it alone, or a residual add then, when the sum's only user is one, an activation."""
    (user,) = node.users
    act = activation_of(user, node, root, keep)
    if act is not None:
        return _Plan(act, None, (user,)), ""
    other = residual_of(user, node)
    if other is None:
        return None, f"followed by {_user_name(user)}"
    if id(root.get_submodule(node.target)) in keep:  # a pre-hook that replaces the input would drop the residual
        return None, "followed by add (a hooked layer takes no residual)"
    if not _movable(node, user, root, keep):  # the tap reads x at the add's place, and r there too
        return None, "followed by add, after an in-place op"
    after = list(user.users)
    act = activation_of(after[0], user, root, keep) if len(after) == 1 else None
    if act is None:  # the add alone (a projection BN's residual, no activation after it)
        return _Plan(Activation(), other, (user,)), ""
    return _Plan(act, other, (after[0], user)), ""


def activation_of(node: fx.Node, source: fx.Node, root: nn.Module, keep: set[int] = frozenset()) -> Activation | None:
    """The activation ``node`` applies to ``source`` alone, or None (not an activation we fuse, or it takes
    other tensors, or it is a module in ``keep``: one with hooks, which must still fire)."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if node.args != (source,) or node.kwargs or id(module) in keep or _has_hooks(module):
            return None
        return module_activation(module)
    if node.op == "call_function" and node.target in _FUNCTIONS:
        if not node.args or node.args[0] is not source:
            return None
        return _function_activation(_FUNCTIONS[node.target], tuple(node.args[1:]), dict(node.kwargs))
    if node.op == "call_method" and node.target in _METHODS:
        if node.args != (source,) or node.kwargs:
            return None
        return Activation(_METHODS[node.target])
    return None


class _Tracer(fx.Tracer):
    """Taps, and modules whose hooks must fire, are leaves; torch's own modules are leaves as usual."""

    def __init__(self, keep_whole: set[int]):
        super().__init__()
        self.keep_whole = keep_whole
        self.inlined: dict[int, nn.Module] = {}  # the modules whose forward the graph stands for

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BNTap) or id(m) in self.keep_whole or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if not self.is_leaf_module(m, self.path_of_module(m)):
            self.inlined[id(m)] = m
        return super().call_module(m, forward, args, kwargs)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None)
                or getattr(m, "_backward_pre_hooks", None))


@dataclass
class Fusion:
    """What :func:`fuse_epilogues` did to a teacher.

    Attributes:
        fused: qualified name of each tap's BN layer -> the activation it now applies (identity: a residual
            add alone).
        residual: the names in ``fused`` whose tap also adds the residual before the activation
            (``a(BN(x) + r)``: a basic block's ``relu(bn2(conv2(h)) + shortcut)``).
        reason: why nothing was fused, or None when something was.
        unfused: BN layers followed by something the taps do not fuse, with what (for the docs and tests).
    """

    fused: dict[str, Activation] = field(default_factory=dict)
    residual: set[str] = field(default_factory=set)
    reason: str | None = None
    unfused: dict[str, str] = field(default_factory=dict)
    _forward: "_FusedForward | None" = None
    _taps: list = field(default_factory=list)

    def remove(self) -> None:
        """Give the teacher its own forward back and the taps no epilogue (idempotent)."""
        if self._forward is not None:
            teacher = self._forward.teacher
            if teacher.__dict__.get("forward") is self._forward:
                del teacher.__dict__["forward"]
            self._forward = None
        for tap in self._taps:
            tap.activation = None
        self._taps = []


def _resolves(root: nn.Module, target: str) -> bool:
    try:
        attrgetter(target)(root)
    except AttributeError:
        return False
    return True


def _user_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def _positional_only_signature(teacher: nn.Module) -> int | None:
    """How many inputs ``type(teacher).forward`` takes when they are all plain positional parameters without
    defaults (what a trace can stand for: fx turns an optional argument into a Proxy and bakes in the branch
    taken for it), else None."""
    try:
        params = list(inspect.signature(type(teacher).forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return None
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in plain or p.default is not inspect.Parameter.empty for p in params):
        return None
    return len(params)


_SCALARS = (bool, int, float, str, type(None))


def _module_state(modules: list[nn.Module]) -> tuple:
    """What the traced graph baked in, per module: its plain Python attributes (the train/eval mode, flags and
    counters a ``forward`` may branch on), its hook counts (an inlined module's hooks would not fire), and
    whether global module hooks exist."""
    global_hooks = bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)
    return global_hooks, tuple(
        (tuple((k, v) for k, v in m.__dict__.items() if type(v) in _SCALARS), len(m._forward_hooks),
         len(m._forward_pre_hooks)) for m in modules)


def _restore_attributes(modules: list[nn.Module], state: tuple) -> None:
    """Put back the plain attributes a trace changed (a call counter in a forward counts the trace too)."""
    for m, (scalars, _, _) in zip(modules, state[1]):
        for k, v in scalars:
            if m.__dict__.get(k, v) != v or type(m.__dict__.get(k)) is not type(v):
                m.__dict__[k] = v


class _FusedForward:
    """The teacher's ``forward`` while attached: the rewritten graph's code with the teacher as ``self``, while
    the call and the modules are as they were traced; the class's own forward otherwise.

    The taps apply their epilogues only inside this call (``record.epilogues``), so a submodule called on its
    own (``teacher.features(x)``) keeps its own activations. ``copy.deepcopy`` of the teacher gives the copy a
    fused forward of its own (its modules, its record); pickling is refused (the code is generated)."""

    def __init__(self, teacher: nn.Module, code: Callable, record, inputs: int, baked: list[nn.Module]):
        self.teacher, self.code, self.record, self.inputs = teacher, code, record, inputs
        # Only what the graph baked in is watched per call: the modules whose forward it inlined and the
        # activation modules it took out. Every other module is called as it is and reads its own state then.
        self.modules = baked
        self.state = _module_state(self.modules)

    def __call__(self, *args, **kwargs):
        teacher, record = self.teacher, self.record
        if kwargs or len(args) != self.inputs or _module_state(self.modules) != self.state:
            return type(teacher).forward(teacher, *args, **kwargs)  # unfused: the taps apply no epilogue
        record.epilogues = True
        try:
            return self.code(teacher, *args)
        finally:
            record.epilogues = False

    def __deepcopy__(self, memo):
        if id(self.teacher) not in memo:  # copied on its own, not as part of its teacher: nothing to bind to
            raise RuntimeError("fastdfd: a fused forward copies only with its teacher (copy.deepcopy(teacher))")
        clone = object.__new__(_FusedForward)
        clone.teacher, clone.code, clone.inputs = memo[id(self.teacher)], self.code, self.inputs
        clone.record, clone.modules = copy.deepcopy(self.record, memo), copy.deepcopy(self.modules, memo)
        clone.state = self.state
        return clone

    def __reduce__(self):
        raise TypeError("fastdfd: a teacher with a MomentMatcher attached cannot be pickled while its activations "
                        "are fused into the taps: save teacher.state_dict(), remove the matcher first, or attach it "
                        "with fuse_epilogues=False")


def fuse_epilogues(teacher: nn.Module, taps: dict[str, BNTap], record) -> Fusion:
    """Trace ``teacher`` (its BN layers already swapped for ``taps``, by qualified name) and fuse each tap's
    activation into it; ``record`` (the taps' :class:`~.moment_record.MomentRecord`) carries the switch that
    turns the epilogues on inside the rewritten forward only. Returns the :class:`Fusion`; never raises for
    a teacher it cannot rewrite (the reason is in the result)."""
    if "forward" in teacher.__dict__:
        return Fusion(reason="the teacher already has a forward of its own on the instance (kept, unfused)")
    inputs = _positional_only_signature(teacher)
    if inputs is None:
        return Fusion(reason=f"{type(teacher).__name__}.forward takes optional, keyword or variable arguments, "
                             "which a trace would fix")
    by_id = {id(tap): name for name, tap in taps.items()}
    keep_whole = {id(m) for m in teacher.modules() if m is not teacher and _has_hooks(m)}
    modules = list(teacher.modules())
    before = _module_state(modules)
    tracer = _Tracer(keep_whole)
    try:
        graph = tracer.trace(teacher)
    except Exception as exc:  # noqa: BLE001 (any tracing failure leaves the teacher as it is)
        _restore_attributes(modules, before)
        return Fusion(reason=f"torch.fx could not trace {type(teacher).__name__}.forward ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})")
    if _module_state(modules) != before:  # the forward keeps Python state (a counter): a graph cannot stand for it
        _restore_attributes(modules, before)
        return Fusion(reason=f"{type(teacher).__name__}.forward changes its modules' Python attributes (a call "
                             "counter, a cache), which a traced graph would freeze")
    fusion = Fusion()
    # every call of each tap, with the epilogue that alone follows it (None: not fusable); a tap called more
    # than once is fused only when every call is followed by the same kind of epilogue
    calls: dict[str, list[tuple[fx.Node, _Plan | None]]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        name = by_id.get(id(teacher.get_submodule(node.target)))
        if name is None:
            continue
        tap = taps[name]
        users = list(node.users)
        plan = None
        if not tap.flavour.fused or tap.flavour.epilogue:
            fusion.unfused[name] = f"a {tap.flavour.name} layer (its own forward or epilogue)"
        elif len(users) != 1:
            fusion.unfused[name] = f"its output has {len(users)} users"
        elif len(node.args) != 1 or node.kwargs:
            fusion.unfused[name] = "called with more than its input"
        else:
            plan, why = _plan(node, teacher, keep_whole)
            if plan is None:
                fusion.unfused[name] = why
        calls.setdefault(name, []).append((node, plan))
    fused_taps: dict[str, Activation] = {}
    baked = {id(teacher): teacher, **tracer.inlined}
    replaced: dict[fx.Node, fx.Node] = {}  # erased node -> the tap node now standing for it

    def current(n: fx.Node) -> fx.Node:  # a residual planned before an earlier rewrite took its node out
        while n in replaced:
            n = replaced[n]
        return n

    # nodes a plan takes over can be claimed by one tap only (``bn2(h) + shortcut_bn(x)``: both outputs go to
    # the add alone): the first tap in graph order keeps its plans, the other is left unfused
    claimed: dict[fx.Node, str] = {}
    for name, nodes in calls.items():
        keys = {None if plan is None else plan.key for _, plan in nodes}
        if None in keys or len(keys) != 1:
            if len(nodes) > 1 and None not in keys:
                fusion.unfused[name] = "called more than once, with different epilogues"
            calls[name] = []
            continue
        taken = {claimed[n] for _, plan in nodes for n in plan.erase if n in claimed}
        if taken:
            fusion.unfused[name] = f"its add is fused into {sorted(taken)[0]}"
            calls[name] = []
            continue
        claimed.update({n: name for _, plan in nodes for n in plan.erase})
    for name, nodes in calls.items():
        if not nodes:
            continue
        for node, plan in nodes:
            for user in plan.erase:
                if user.op == "call_module":  # an activation module no longer called: its hooks and slope are baked
                    module = teacher.get_submodule(user.target)
                    baked[id(module)] = module
            if plan.residual is not None:
                # the tap now reads the residual, which the graph may compute after it (a block's shortcut):
                # the tap moves down to the add's place (its only user was the add, its inputs come before,
                # and no in-place op lies between: _movable). Its hooks would not see the residual: watched.
                tap_module = teacher.get_submodule(node.target)
                baked[id(tap_module)] = tap_module
                plan.erase[-1].prepend(node)
                node.args = (node.args[0], current(plan.residual))
            plan.erase[0].replace_all_uses_with(node)
            for user in plan.erase:
                replaced[user] = node
                graph.erase_node(user)
        plan = nodes[0][1]
        fused_taps[name] = plan.activation
        if plan.residual is not None:
            fusion.residual.add(name)
    if not fused_taps:
        fusion.reason = "no BN layer is followed by an activation or residual add the taps fuse"
        return fusion
    # The rewritten forward's code runs with the teacher itself as ``self``: every module, parameter and buffer
    # it names is then the teacher's live one (``.to()`` replaces buffers; a GraphModule would keep copies).
    missing = [n.target for n in graph.nodes if n.op == "get_attr" and not _resolves(teacher, n.target)]
    if missing:
        return Fusion(reason=f"the trace made constants the teacher does not hold ({missing[:3]})",
                      unfused=fusion.unfused)
    try:
        graph.lint()
        code = type(fx.GraphModule(teacher, graph)).forward
    except Exception as exc:  # noqa: BLE001 (nothing is changed yet)
        return Fusion(reason=f"the rewritten graph did not build ({type(exc).__name__}: {exc})", unfused=fusion.unfused)

    record.epilogues = False  # on only inside the fused forward
    for name, act in fused_taps.items():
        taps[name].activation = act
    fused_forward = _FusedForward(teacher, code, record, inputs, list(baked.values()))
    teacher.forward = fused_forward
    fusion.fused = dict(fused_taps)
    fusion._forward, fusion._taps = fused_forward, [taps[name] for name in fused_taps]
    return fusion


__all__ = ["Fusion", "activation_of", "fuse_epilogues"]
