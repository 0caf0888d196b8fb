"""Evaluation datasets for fastdfd; everything is read from disk, nothing is downloaded."""

from .class_names import class_names_for, imagenet_class_names
from .cifar import CIFAR, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from .cifar_jpeg import CIFAR10_CLASSES, CIFAR10JPEG
from .digits import DigitsSplit, load_digits_split
from .folders import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageFolder
from .loaders import SPEC_FORMS, make_eval_loader
from .train_sets import make_train_dataset

__all__ = [
    "CIFAR",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_CLASSES",
    "CIFAR10JPEG",
    "DigitsSplit",
    "class_names_for",
    "imagenet_class_names",
    "load_digits_split",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "SPEC_FORMS",
    "make_eval_loader",
    "make_train_dataset",
]
