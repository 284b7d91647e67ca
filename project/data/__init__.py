"""DataModules: uint8 batches from the loaders; augmentation and normalisation on the device.

Every DataModule knows ``num_classes``, ``in_channels`` and ``image_size`` right after
``__init__`` (the CLI links them into the model).
"""

from project.data.base import InMemoryDataModule
from project.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from project.data.folder import ImageFolderDataModule
from project.data.loader import InMemoryLoader
from project.data.mnist import MNISTDataModule, MNISTSampleDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "InMemoryLoader",
    "MNISTDataModule",
    "MNISTSampleDataModule",
]
