"""The machinery behind every settings object: a field that carries its doc, kind, choices and bounds.

A settings class is a frozen dataclass whose fields are made by :func:`setting`. From those fields alone:

- the values are checked and normalised at construction (:meth:`Settings.__post_init__`: an int where a
  float is due becomes a float, a list becomes a tuple, ``True`` for a switch becomes ``"on"``);
- the CLI flags are made (:mod:`fastdfd.settings.cli`);
- the recipe keys are checked (:mod:`fastdfd.recipes.schema`);
- a trainer's ``config()`` (what a checkpoint must match to resume) is written (:meth:`Settings.config`).

So a new setting is one field in one class: every surface sees it. ``absent`` is the value that a file
written before the field existed implies (a checkpoint's config, a recipe): a field with ``absent`` is
left out of ``config()`` while it holds that value (older checkpoints still resume) and may be left out of
a recipe. A field without it is always recorded and a recipe must name it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["KINDS", "REQUIRED", "Settings", "Spec", "setting"]

class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # ``absent`` of a field every recipe names and every config records

# what each kind holds; the CLI parses a string into it, recipes give it in TOML
KINDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "ints": "a non-empty list of positive integers",
    "floats": "a list of numbers",
    "chunk": "a positive integer, 'all' or 'auto'",
    "count": "a positive integer or 'all'",
    "switch": "off, auto or on",
    "optional_bool": "true, false or unset",
    "layer_weights": "a list of numbers (one per BN layer) or a table of layer name = weight",
}


@dataclass(frozen=True)
class Spec:
    """What one setting is: its kind, its doc, the values it may take, and where it is exposed."""

    name: str
    kind: str
    doc: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # value >= minimum
    above: float | None = None  # value > above
    length: int | None = None  # for "floats": exactly this many
    absent: Any = REQUIRED
    cli: bool = True  # a flag of the commands that take this settings class
    recipe: bool = True  # a key of the recipe section that takes this settings class
    config: bool = True  # part of what a checkpoint must match to resume

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def expected(self) -> str:
        what = KINDS[self.kind]
        if self.choices:
            what = f"one of {', '.join(self.choices)}"
        if self.minimum is not None:
            what += f", at least {self.minimum:g}"
        if self.above is not None:
            what += f", above {self.above:g}"
        if self.length is not None:
            what += f", {self.length} of them"
        return what

    def check(self, value: Any, where: str) -> Any:
        """The value normalised (floats as float, lists as tuples, switch bools as off/on), or ValueError
        naming ``where`` (the field's owner, a flag or a recipe key), the value and what is expected."""
        out = self._normalise(value)
        if out is _BAD:
            raise ValueError(f"{where} = {value!r}: expected {self.expected} ({self.doc})")
        if self.choices is not None and out not in self.choices:
            raise ValueError(f"{where} = {value!r}: expected one of {', '.join(self.choices)}")
        for v in _numbers(self.kind, out):
            if not math.isfinite(v) or (self.minimum is not None and v < self.minimum) or (
                    self.above is not None and v <= self.above):
                raise ValueError(f"{where} = {value!r}: expected {self.expected}")
        return out

    def _normalise(self, value: Any) -> Any:
        k = self.kind
        if k == "int":
            return value if _is_int(value) else _BAD
        if k == "float":
            return float(value) if _is_number(value) else _BAD
        if k == "bool":
            return value if isinstance(value, bool) else _BAD
        if k == "str":
            return value if isinstance(value, str) else _BAD
        if k == "ints":
            ok = isinstance(value, (list, tuple)) and value and all(_is_int(v) and v > 0 for v in value)
            return tuple(value) if ok else _BAD
        if k == "floats":
            ok = isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)
            ok = ok and (self.length is None or len(value) == self.length)
            return tuple(float(v) for v in value) if ok else _BAD
        if k in ("chunk", "count"):
            if value is None or value == "all":
                return None
            if k == "chunk" and value == "auto":
                return value
            return value if _is_int(value) and value > 0 else _BAD
        if k == "switch":
            value = {False: "off", True: "on"}.get(value, value) if isinstance(value, bool) else value
            return value if value in ("off", "auto", "on") else _BAD
        if k == "optional_bool":
            return value if value is None or isinstance(value, bool) else _BAD
        if k == "layer_weights":
            if value is None:
                return None
            if isinstance(value, Mapping):
                ok = all(isinstance(n, str) and _is_number(v) for n, v in value.items())
                return _FrozenWeights({n: float(v) for n, v in value.items()}) if ok else _BAD
            ok = isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)
            return tuple(float(v) for v in value) if ok else _BAD
        raise AssertionError(k)

    def parse(self, text: str) -> Any:
        """A command-line string as this kind's value (then checked by :meth:`check`)."""
        k = self.kind
        try:
            if k == "int":
                return int(text)
            if k == "float":
                return float(text)
            if k == "bool":
                return {"true": True, "false": False, "1": True, "0": False}[text.lower()]
            if k == "ints":
                return tuple(int(v) for v in text.split(","))
            if k == "floats":
                return tuple(float(v) for v in text.split(","))
            if k in ("chunk", "count"):
                return text if text in ("all", "auto") else int(text)
            if k == "layer_weights":  # "0.5,1,1" in layer order, or "conv1.bn=10,layer1.0.bn1=2"
                items = [p for p in text.split(",") if p]
                if all("=" in p for p in items):
                    return {n.strip(): float(v) for n, v in (p.split("=", 1) for p in items)}
                return tuple(float(v) for v in items)
        except (ValueError, KeyError):
            return text  # check() names it with what was expected
        return text

    def plain(self, value: Any) -> Any:
        """The value as JSON and TOML hold it (tuples as lists, weight tables as dicts)."""
        if isinstance(value, Mapping):
            return dict(value)
        return list(value) if isinstance(value, tuple) else value


class _FrozenWeights(dict):
    """A weight table that compares and hashes by value (a frozen dataclass stays hashable)."""

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.items())))

    def _refuse(self, *_args, **_kwargs):
        raise TypeError("settings are frozen: make a new one with .replace(...)")

    __setitem__ = __delitem__ = update = pop = clear = setdefault = _refuse


_BAD = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:  # TOML writes 1 for 1.0 as often as not
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(kind: str, value: Any) -> list[float]:
    if kind in ("int", "float"):
        return [value]
    if kind in ("ints", "floats"):
        return list(value)
    if kind in ("chunk", "count") and _is_int(value):
        return [value]
    return []


def setting(default: Any, doc: str, *, kind: str, choices=None, minimum=None, above=None, length=None,
            absent: Any = REQUIRED, cli: bool = True, recipe: bool = True, config: bool = True):
    """A dataclass field carrying its :class:`Spec` (the field's name is filled in by the class)."""
    if kind not in KINDS:
        raise ValueError(f"unknown setting kind {kind!r}; known: {sorted(KINDS)}")
    spec = dict(kind=kind, doc=doc, choices=None if choices is None else tuple(choices), minimum=minimum,
                above=above, length=length, absent=absent, cli=cli, recipe=recipe, config=config)
    return dataclasses.field(default=default, metadata={"fastdfd.setting": spec})


class Settings:
    """Base of the frozen settings dataclasses: values checked at construction, one :class:`Spec` per field.

    Subclasses add cross-field checks in ``_check`` (called after every field is normalised).
    """

    _specs: ClassVar[dict[type, tuple[Spec, ...]]] = {}

    @classmethod
    def specs(cls) -> tuple[Spec, ...]:
        """Every field's spec, in declaration order."""
        if cls not in Settings._specs:
            Settings._specs[cls] = tuple(Spec(name=f.name, **f.metadata["fastdfd.setting"])
                                         for f in dataclasses.fields(cls) if "fastdfd.setting" in f.metadata)
        return Settings._specs[cls]

    @classmethod
    def spec(cls, name: str) -> Spec:
        for s in cls.specs():
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(s.name for s in cls.specs())

    def __post_init__(self) -> None:
        for s in self.specs():
            object.__setattr__(self, s.name, s.check(getattr(self, s.name), f"{type(self).__name__}.{s.name}"))
        self._check()

    def _check(self) -> None:
        """Cross-field checks of a subclass (ValueError); nothing by default."""

    def replace(self, **changes: Any):
        """A copy with ``changes`` (checked like the original); an unknown name lists the known ones."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no setting {unknown}; its settings are "
                            f"{', '.join(self.field_names())}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = ""):
        """An instance from the keys of ``values`` that are this class's fields (the others ignored); a key
        left out takes the class's default. ``where`` prefixes the field names in errors (a recipe section)."""
        given = {s.name: values[s.name] for s in cls.specs() if s.name in values}
        try:
            return cls(**given)
        except ValueError as e:
            if not where:
                raise
            raise ValueError(str(e).replace(f"{cls.__name__}.", f"{where}.")) from None

    def config(self) -> dict[str, Any]:
        """The fields a checkpoint must match to resume, as plain values; a field holding its ``absent`` value
        is left out (a checkpoint written before the field existed matches it)."""
        out = {}
        for s in self.specs():
            value = getattr(self, s.name)
            if s.config and not (s.absent is not REQUIRED and value == s.absent):
                out[s.name] = s.plain(value)
        return out

    def as_dict(self) -> dict[str, Any]:
        """Every field as a plain value (for summaries and run manifests)."""
        return {s.name: s.plain(getattr(self, s.name)) for s in self.specs()}
