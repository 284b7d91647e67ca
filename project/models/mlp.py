"""Multi-layer perceptron backbone (784-256-128 for MNIST)."""

from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Flatten, then ``Linear -> ReLU`` per hidden width.

    Args:
        in_channels: Image channels.
        image_size: Image height and width.
        hidden: Widths of the hidden layers; the last is ``num_features``.
        dropout: Dropout after each hidden layer (0 disables).
    """

    def __init__(
        self, in_channels: int = 1, image_size: int = 28, hidden: Sequence[int] = (256, 128), dropout: float = 0.0
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        super().__init__(*layers)
        self.num_features = width
