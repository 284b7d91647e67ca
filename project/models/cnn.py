"""A small two-conv CNN: the baseline of the seed documents, with optional BatchNorm."""

from collections.abc import Sequence

import torch
from torch import nn


class SimpleCNN(nn.Module):
    """``[conv3x3 -> (BN) -> ReLU -> maxpool2] x len(channels) -> flatten -> fc -> ReLU``.

    Args:
        in_channels: Image channels.
        image_size: Image height and width.
        channels: Output channels of each conv block.
        hidden: Width of the fully connected layer (``num_features``).
        batch_norm: Put BatchNorm after each conv (the conv then has no bias).
        dropout: Dropout before the fully connected layer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        batch_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                blocks.append(nn.BatchNorm2d(c_out))
            blocks += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        blocks.append(nn.Flatten())
        if dropout > 0:
            blocks.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*blocks)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(inplace=True))
        self.num_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
