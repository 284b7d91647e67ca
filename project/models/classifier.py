"""A backbone with its linear classification head, and the registry of backbones by name."""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from project.errors import UserError
from project.models.cnn import SimpleCNN
from project.models.lenet import LeNet5
from project.models.mlp import MLP
from project.models.resnet import ResNet9, resnet18_cifar

#: Backbone builders by the name configs use. Each takes ``in_channels`` and ``image_size``
#: plus its own keyword arguments, and returns a module with a ``num_features`` attribute.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "cnn": SimpleCNN,
    "resnet9": ResNet9,
    "resnet18": resnet18_cifar,
}


class Classifier(nn.Module):
    """``head(backbone(x))``: logits ``[B, num_classes]`` from images ``[B, C, H, W]``.

    The head is always named ``head`` so fine-tuning, pruning and quantization can find it.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_backbone(arch: str, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``arch`` in :data:`ARCHITECTURES`."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}: choose one of {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](in_channels=in_channels, image_size=image_size, **kwargs)


def build_network(arch: str, num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> Classifier:
    """Build backbone ``arch`` with a ``num_classes`` head."""
    return Classifier(build_backbone(arch, in_channels, image_size, **kwargs), num_classes)
