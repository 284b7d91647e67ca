"""ResNets for small (32x32) images."""

import torch
from torch import nn
from torchvision.models import resnet18


def resnet18_cifar(in_channels: int = 3, image_size: int = 32, stem: str = "cifar") -> nn.Module:
    """torchvision's ResNet-18 without its classifier (``num_features`` = 512).

    Args:
        in_channels: Image channels.
        image_size: Unused (the network pools globally); kept so every backbone has the same signature.
        stem: ``"cifar"`` replaces the 7x7/2 conv and max-pool by one 3x3/1 conv, which keeps
            the resolution that 32x32 inputs need; ``"imagenet"`` keeps torchvision's stem
            (use it for large images).
    """
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    net = resnet18()
    if stem == "cifar":
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    net.num_features = 512
    return net


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """The ResNet-9 of Page's DAWNBench entry (conv-BN-ReLU blocks, two residual stages).

    Args:
        in_channels: Image channels.
        image_size: Unused (global pooling); kept for the common backbone signature.
        width: Channels of the first block; later blocks use 2x, 4x and 8x.
        out_scale: Multiplies the pooled features (Page's net scales its logits by 0.125, which lets it
            train at a high learning rate); 1.0 leaves them unscaled.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, width: int = 64, out_scale: float = 1.0) -> None:
        super().__init__()
        self.out_scale = out_scale
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _Residual(2 * w),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w),
            nn.MaxPool2d(2),
            _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.num_features = 8 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return x * self.out_scale if self.out_scale != 1.0 else x
