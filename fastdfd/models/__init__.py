"""Networks: CIFAR ResNets, Wide ResNets, the digits CNNs and the generator; a registry by name."""

from . import digits, mobilenet, resnet_cifar, wrn  # noqa: F401  (register the models)
from .generator import Generator, GeneratorSpec
from .registry import create_model, list_models, register_model

__all__ = ["Generator", "GeneratorSpec", "create_model", "list_models", "register_model"]
