"""Read a recipe file, apply ``--set`` overrides, and check every key against the schema.

Checks here need nothing but the file: unknown keys (with the closest known key), missing
keys, types, choices and ranges, and the teacher_training table being present exactly when
it is used. Checks that look at the disk or the models (dataset root, class counts,
checkpoint shapes) run in :mod:`fastdfd.recipes.preflight`, still before any work.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..input_space import InputSpace
from ..models.zoo import is_zoo_spec
from ..settings import DISTILL_STAGE, GENERATOR_STAGE, TeacherSettings, TurnsSettings
from .schema import OPTIONAL_SECTIONS, SECTIONS, TOP, check_value, is_required

BUNDLED = Path(__file__).parent


@dataclass
class Recipe:
    """A checked recipe: ``values`` is the resolved table (file + overrides)."""

    values: dict[str, Any]
    source: str  # the file it came from
    text: str  # the file as written, kept verbatim in the run directory
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.values["name"]

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    def has(self, section: str) -> bool:
        return section in self.values

    def resolved_json(self) -> str:
        return json.dumps(self.values, indent=2, sort_keys=True)


def list_recipes() -> list[str]:
    """Names of the recipes shipped with fastdfd (``fastdfd run NAME`` finds them)."""
    return sorted(p.stem for p in BUNDLED.glob("*.toml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A path to an existing file, else the bundled recipe of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = BUNDLED / f"{Path(name_or_path).stem}.toml"
    if path.suffix in ("", ".toml") and path.parent == Path(".") and bundled.is_file():
        return bundled
    raise FileNotFoundError(f"recipe not found: {name_or_path} (no such file, and not one of the bundled "
                            f"recipes: {', '.join(list_recipes())})")


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value``: the value is read as TOML (so 3, 1e-3, true, [1, 2], "x"), else as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. generators.steps=500")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def _apply(values: dict, path: list[str], value: Any, item: str) -> None:
    if len(path) == 1:
        table = values
    elif len(path) == 2:
        if path[0] not in SECTIONS:
            raise ValueError(f"--set {item!r}: unknown recipe section {path[0]!r}{_suggest(path[0], SECTIONS)}")
        table = values.setdefault(path[0], {})
    else:
        raise ValueError(f"--set {item!r}: keys are KEY or SECTION.KEY")
    table[path[-1]] = value


def check_values(values: dict[str, Any]) -> dict[str, Any]:
    """The checked, normalised copy of a recipe table; ValueError names the first bad key."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in TOP:
            out[key] = check_value(key, TOP[key], value)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"recipe key {key} must be a table ([{key}])")
            section = {}
            for sub, v in value.items():
                if sub not in SECTIONS[key]:
                    raise ValueError(f"unknown recipe key {key}.{sub}{_suggest(sub, SECTIONS[key])}; "
                                     f"[{key}] takes: {', '.join(SECTIONS[key])}")
                section[sub] = check_value(f"{key}.{sub}", SECTIONS[key][sub], v)
            out[key] = section
        else:
            raise ValueError(f"unknown recipe key {key}{_suggest(key, [*TOP, *SECTIONS])}")
    for key in TOP:
        if key not in out:
            raise ValueError(f"recipe is missing the key {key} ({TOP[key].doc})")
    for name, fields in SECTIONS.items():
        if name not in out:
            if name in OPTIONAL_SECTIONS:
                continue
            raise ValueError(f"recipe is missing the table [{name}]")
        for key, f in fields.items():
            if key not in out[name] and is_required(f):
                raise ValueError(f"recipe is missing the key {name}.{key} ({f.doc})")
    _check_combinations(out)
    return out


def _check_input_space(v: dict[str, Any]) -> None:
    """teacher.input_space parses and fits data.channels; a preset is recorded by its canonical name."""
    spec = v["teacher"]["input_space"]
    try:
        space = InputSpace.parse(spec)
        space.check_channels(v["data"]["channels"], f"the data's images (data.channels = {v['data']['channels']})")
    except ValueError as e:
        raise ValueError(f"recipe key teacher.input_space = {spec!r}: {e}") from None
    if space.name != "custom":
        v["teacher"]["input_space"] = space.name  # '[-1,1]' and 'ImageNet' resolve to the preset's name


def published_weights(teacher: dict[str, Any]) -> str:
    """The key that asks for a zoo's published teacher weights (``teacher.pretrained``, ``teacher.weights_enum``,
    ``teacher.model`` as torchvision:NAME:WEIGHTS), or '' when none does."""
    model = teacher.get("model")
    if teacher.get("pretrained") is True:
        return "teacher.pretrained"
    if isinstance(teacher.get("weights_enum"), str) and teacher["weights_enum"]:
        return "teacher.weights_enum"
    if isinstance(model, str) and is_zoo_spec(model) and model.count(":") == 2:
        return "teacher.model"
    return ""


def _check_teacher(t: dict[str, Any]) -> None:
    """One source of the teacher's weights; published weights only for a zoo teacher."""
    key = published_weights(t)
    if not key:
        return
    value = {"teacher.pretrained": True, "teacher.weights_enum": t.get("weights_enum"),
             "teacher.model": t["model"]}[key]
    if not is_zoo_spec(t["model"]):
        raise ValueError(f"recipe key {key} = {value!r} takes a zoo teacher (timm:NAME or torchvision:NAME), but "
                         f"teacher.model = {t['model']!r}; fastdfd's own models load teacher.weights")
    if t["weights"]:
        raise ValueError(f"recipe keys teacher.weights = {t['weights']!r} and {key} = {value!r}: give one source of "
                         f"the teacher's weights (set weights = \"\" for the published ones)")


def _check_combinations(v: dict[str, Any]) -> None:
    _check_input_space(v)
    _check_teacher(v["teacher"])
    train = v["teacher"]["weights"] == "" and not published_weights(v["teacher"])
    if train and "teacher_training" not in v:
        raise ValueError("teacher.weights is empty (train the teacher) but the recipe has no [teacher_training] table")
    if not train and "teacher_training" in v:
        source = (f"teacher.weights = {v['teacher']['weights']!r}" if v["teacher"]["weights"]
                  else f"{published_weights(v['teacher'])} (published weights)")
        raise ValueError(f"the recipe has a [teacher_training] table but also {source}; set weights = \"\" "
                         f"(and no published weights) to train the teacher, or drop the table")
    data = v["data"]
    if (data["dataset"] == "digits") != (data["root"] == ""):
        raise ValueError(f"data.root = {data['root']!r}: digits takes root = \"\", every other dataset needs its root")
    # each table as the settings objects its stage builds: their checks across fields (a momentum below 1, a pool
    # that some generator step fills, ...) refuse the recipe here, not when the stage starts after hours of another
    for section, classes in (("generators", GENERATOR_STAGE), ("distill", DISTILL_STAGE),
                             ("teacher_training", (TeacherSettings,)), ("turns", (TurnsSettings,))):
        for cls in classes if section in v else ():
            cls.from_mapping(v[section], section)
    g = v["generators"]
    if g.get("adversarial_weight"):
        raise ValueError(f"generators.adversarial_weight = {g['adversarial_weight']}: a recipe's generators train "
                         "before the student exists (with [turns] too: their warm-up), so there is no student to play "
                         "against; set it to 0")
    if "turns" in v and g["offload"]:
        raise ValueError("[turns] trains the generators beside the student on the device; generators.offload = true "
                         "keeps them in host memory between steps: set offload = false or drop [turns]")
    if "turns" in v and v["turns"]["pool"] and g["cuda_graph"] == "on":
        raise ValueError("[turns] with turns.pool > 0: each generator step copies its images into the pool, which a "
                         "CUDA graph cannot capture; set generators.cuda_graph = \"auto\" (the warm-up is still "
                         "graphed) or \"off\"")
    for section in ("generators", "distill"):
        chunk = v[section]["generators_per_step"]
        if isinstance(chunk, int) and chunk > v["generators"]["num_generators"]:
            raise ValueError(f"{section}.generators_per_step = {chunk} exceeds generators.num_generators = "
                             f"{v['generators']['num_generators']}")


def load_recipe(name_or_path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and check a recipe. Raises FileNotFoundError or ValueError naming the key."""
    path = find_recipe(name_or_path)
    text = path.read_text()
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe {path} is not valid TOML: {e}") from None
    values = copy.deepcopy(values)
    overrides = list(overrides)
    for item in overrides:
        key, value = _parse_override(item)
        _apply(values, key, value, item)
        if key[:1] == ["teacher"] and (key == ["teacher", "weights"] and value or
                                       published_weights(values.get("teacher") or {})):
            # --set teacher.weights=FILE (or teacher.pretrained=true, ...) on a recipe that trains its teacher:
            # bring your own teacher, so the training table is no longer part of the run (resolved.json says so)
            values.pop("teacher_training", None)
    try:
        checked = check_values(values)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return Recipe(checked, str(path), text, overrides)
