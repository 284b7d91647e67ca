"""LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, as commonly trained today."""

import torch
from torch import nn


class LeNet5(nn.Module):
    """Two 5x5 conv layers (6 and 16 filters) then fully connected 120 -> 84.

    A 28x28 input is padded by 2 in the first conv, so the classic 16x5x5 feature map
    feeds the first fully connected layer; other sizes work too.

    Args:
        in_channels: Image channels.
        image_size: Image height and width.
        relu_after_pool: Max-pool each conv's output before its ReLU. The same function (ReLU is
            monotonic, so it commutes with max) and the same checkpoint keys, with ReLU and its
            backward pass on a 4x smaller tensor: about 10% faster training on a CPU. Keep it off for
            int8 QAT, where the x86 quantizer fuses conv + ReLU and quantizes the non-negative output;
            a checkpoint trained either way loads into the other.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, relu_after_pool: bool = False) -> None:
        super().__init__()

        def block(conv: nn.Conv2d) -> list[nn.Module]:
            act, pool = nn.ReLU(inplace=True), nn.MaxPool2d(2)
            return [conv, pool, act] if relu_after_pool else [conv, act, pool]

        self.features = nn.Sequential(
            *block(nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)),
            *block(nn.Conv2d(6, 16, kernel_size=5)),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc = nn.Sequential(
            nn.Linear(flat, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
        )
        self.num_features = 84

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
