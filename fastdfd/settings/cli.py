"""Command-line flags made from settings classes: one ``--flag`` per field, parsed and checked by its spec.

    add_flags(parser, LossSettings, OptimizerSettings)          # --kind, --scope, ..., --lr, --betas, ...
    loss = flags_to_settings(args, LossSettings, base=preset.loss)

Every flag defaults to unset: a flag the user did not give keeps the ``base`` settings' value (a preset's, or
the class's default), so the defaults live in the settings classes alone and the help shows them.
"""

from __future__ import annotations

import argparse
from typing import Any

from .field import Settings, Spec

__all__ = ["add_flags", "flags_to_settings"]


def _parser(spec: Spec):
    def parse(text: str) -> Any:
        try:
            return spec.check(spec.parse(text), spec.flag)
        except ValueError as e:  # argparse prints "argument --flag: <this>" and exits 2
            raise argparse.ArgumentTypeError(str(e).replace(f"{spec.flag} = ", "", 1)) from None
    parse.__name__ = spec.kind  # argparse names the type in some messages
    return parse


def add_flags(parser: argparse.ArgumentParser, *classes: type[Settings], base: dict[type, Settings] | None = None,
              skip: tuple[str, ...] = (), names: dict[str, str] | None = None) -> None:
    """Add a flag for every CLI field of ``classes`` (but ``skip``); ``base`` gives the values shown as
    defaults in the help (default: each class's own). ``names`` maps a field to a flag other than its own
    (``{"batch_size": "--distill-batch"}`` beside another batch flag); the value still lands on the field's
    name, so :func:`flags_to_settings` reads it; ValueError names a key of ``names`` that is no flag here."""
    names = names or {}
    flagged = {s.name for cls in classes for s in cls.specs() if s.cli and s.name not in skip}
    unknown = sorted(set(names) - flagged)
    if unknown:
        raise ValueError(f"add_flags(names=...): {', '.join(unknown)} is not a flag of "
                         f"{', '.join(c.__name__ for c in classes)} (skipped, not a command-line field, or misspelt)")
    for cls in classes:
        shown = (base or {}).get(cls) or cls()
        for spec in cls.specs():
            if not spec.cli or spec.name in skip:
                continue
            flag = names.get(spec.name, spec.flag)
            default = spec.plain(getattr(shown, spec.name))
            help_text = f"{spec.doc} (default: {_show(default)})"
            if spec.kind == "bool":
                parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None,
                                    help=help_text)
            elif spec.kind == "switch":  # the bare flag means auto
                parser.add_argument(flag, dest=spec.name, type=_parser(spec), default=None, nargs="?",
                                    const="auto", metavar=_metavar(spec), help=help_text + "; bare: auto")
            else:
                parser.add_argument(flag, dest=spec.name, type=_parser(spec), default=None,
                                    metavar=_metavar(spec), help=help_text)


def flags_to_settings(args: argparse.Namespace, cls: type[Settings], base: Settings | None = None) -> Settings:
    """``base`` (default: the class's defaults) with every flag of ``cls`` the user gave laid over it."""
    base = base if base is not None else cls()
    given = {s.name: getattr(args, s.name) for s in cls.specs()
             if s.cli and getattr(args, s.name, None) is not None}
    return base.replace(**given)


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _metavar(spec: Spec) -> str:
    if spec.choices:
        return "{" + ",".join(spec.choices) + "}"
    return {"switch": "{off,auto,on}", "chunk": "N|all|auto", "count": "N|all", "ints": "N,N,...",
            "floats": "X,X,...", "layer_weights": "W,W,...|NAME=W,..."}.get(spec.kind, spec.kind.upper())
