"""Architectures: plain ``nn.Module`` s that know nothing of Lightning.

Every backbone maps images ``[B, C, H, W]`` to features ``[B, num_features]`` and reports
``num_features``; :class:`Classifier` puts a linear head on top. :func:`build_network`
builds one by name, which is how configs pick an architecture.
"""

from project.models.classifier import ARCHITECTURES, Classifier, build_backbone, build_network
from project.models.cnn import SimpleCNN
from project.models.lenet import LeNet5
from project.models.mlp import MLP
from project.models.resnet import ResNet9, resnet18_cifar

__all__ = [
    "ARCHITECTURES",
    "Classifier",
    "LeNet5",
    "MLP",
    "ResNet9",
    "SimpleCNN",
    "build_backbone",
    "build_network",
    "resnet18_cifar",
]
