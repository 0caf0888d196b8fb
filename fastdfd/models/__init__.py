"""Networks: CIFAR ResNets (with the field's option-A ResNet-20..110), Wide ResNets, the digits CNNs and
the generator; a registry by name,
which also builds the zoos' architectures as ``timm:NAME`` / ``torchvision:NAME`` (:mod:`.zoo`)."""

from . import digits, mobilenet, resnet_cifar, resnet_cifar_a, wrn  # noqa: F401  (register the models)
from .generator import Generator, GeneratorSpec
from .registry import UnknownModelError, create_model, list_models, register_model
from .zoo import ZOOS, is_zoo_spec, list_zoo_models

__all__ = ["Generator", "GeneratorSpec", "UnknownModelError", "ZOOS", "create_model", "is_zoo_spec",
           "list_models", "list_zoo_models", "register_model"]
