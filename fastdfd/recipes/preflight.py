"""Everything a recipe needs from the disk and the model registry, checked before any work.

The run would otherwise fail hours in: a dataset root that is not there, data whose class
count is not the teacher's, a teacher checkpoint of another architecture, a generator that
cannot be built at the image size. Each is refused here, naming the path, key or figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import make_eval_loader
from ..data.loaders import in_input_space
from ..input_space import InputSpace
from ..models import create_model
from ..models.weights import load_weights
from ..nn import GeneratorEnsemble
from .loader import Recipe, published_weights


@dataclass
class Prepared:
    """What the stages use: the data, an untrained or loaded teacher, a fresh student."""

    eval_loader: Any  # in the teacher's input space
    train_set: Any  # only when the teacher is trained; in the teacher's input space
    teacher: nn.Module
    student: nn.Module
    teacher_trained: bool  # weights came from the recipe's file or the zoo's published ones
    input_space: InputSpace  # teacher.input_space


def data_specs(data: dict) -> tuple[str, str]:
    """(train spec, eval spec) for make_train_dataset / make_eval_loader."""
    kind, root = data["dataset"], data["root"]
    if kind == "digits":
        return "digits", "digits"
    if kind == "folder":  # ImageNet layout: ROOT/train/<class>/..., ROOT/val/<class>/...
        return f"folder:{Path(root) / 'train'}", f"folder:{Path(root) / 'val'}"
    return f"{kind}:{root}", f"{kind}:{root}"


def _model(recipe: Recipe, section: str) -> nn.Module:
    """The registry's or a zoo's (timm:NAME, torchvision:NAME[:WEIGHTS]) model, the teacher with the zoo's
    published weights when ``teacher.pretrained`` / ``teacher.weights_enum`` ask; errors name the recipe key."""
    table, data = recipe[section], recipe["data"]
    name, kwargs = table["model"], {}
    if section == "teacher":
        kwargs = {"pretrained": table.get("pretrained", False), "weights": table.get("weights_enum") or None}
    try:
        return create_model(name, num_classes=data["num_classes"], in_channels=data["channels"], **kwargs)
    except ImportError as e:
        raise ImportError(f"recipe key {section}.model = {name!r}: {e}") from None
    except FileNotFoundError as e:  # published weights neither cached nor downloadable
        raise FileNotFoundError(f"recipe key {section}.model = {name!r}: {e}") from None
    except (KeyError, ValueError) as e:
        raise ValueError(f"recipe key {section}.model = {name!r}: {e}") from None


def _check_classes(what: str, found: int, recipe: Recipe) -> None:
    wanted = recipe["data"]["num_classes"]
    if found != wanted:
        raise ValueError(f"{what} has {found} classes but the teacher has {wanted} (data.num_classes); "
                         "the dataset does not match the teacher")


def ensemble_from_recipe(recipe: Recipe) -> GeneratorEnsemble:
    """The recipe's (untrained) generator ensemble, on the current default device."""
    g, data = recipe["generators"], recipe["data"]
    return GeneratorEnsemble(g["num_generators"], data["num_classes"], image_size=data["image_size"],
                             channels=data["channels"], latent_dim=g["latent_dim"], widths=g["widths"],
                             output_bn=g["output_bn"])


def _check_generators(recipe: Recipe) -> None:
    """Build the ensemble's shapes on the meta device: no memory, but every shape check runs."""
    try:
        with torch.device("meta"):
            ensemble_from_recipe(recipe)
    except ValueError as e:
        raise ValueError(f"recipe [generators] cannot be built: {e}") from None


def preflight(recipe: Recipe, world: int = 1) -> Prepared:
    """Load and check the data and the models; raise before any training starts."""
    data = recipe["data"]
    if data["dataset"] != "digits":
        root = Path(data["root"]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {root} (recipe key data.root)")
    train_spec, eval_spec = data_specs(data)
    space = InputSpace.parse(recipe["teacher"]["input_space"])  # checked against data.channels by the loader
    eval_loader, eval_classes = make_eval_loader(eval_spec, image_size=data["image_size"], input_space=space)
    _check_classes(f"the evaluation data ({eval_spec})", eval_classes, recipe)
    teacher, student = _model(recipe, "teacher"), _model(recipe, "student")
    _check_generators(recipe)
    train_set, weights = None, recipe["teacher"]["weights"]
    if weights:
        load_weights(teacher, Path(weights).expanduser(), "teacher")
    elif not published_weights(recipe["teacher"]):  # else: create_model loaded the zoo's published weights
        if world > 1:
            raise ValueError("teacher training runs in one process; train the teacher first "
                             "(fastdfd train-teacher, or this recipe without torchrun), then set teacher.weights")
        from ..data import make_train_dataset

        train_set, train_classes = make_train_dataset(
            train_spec, image_size=data["image_size"], augment=recipe["teacher_training"]["augment"])
        _check_classes(f"the training data ({train_spec})", train_classes, recipe)
        # the teacher learns in the space it is declared to have (and is evaluated and distilled in)
        train_set = in_input_space(train_set, train_spec, space)
    trained = bool(weights) or bool(published_weights(recipe["teacher"]))
    return Prepared(eval_loader, train_set, teacher, student, trained, space)
