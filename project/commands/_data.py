"""The images ``compress`` calibrates and measures on, taken from the config's DataModule."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def calibration_batches(datamodule: Any, count: int) -> list[torch.Tensor]:
    """The first ``count`` training images, normalised as the network takes them, without augmentation."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches, seen = [], 0
    for batch in datamodule.train_dataloader():
        batches.append(datamodule.transform(batch[0], train=False).cpu()[: count - seen])
        seen += len(batches[-1])
        if seen >= count:
            break
    return batches


def load_test_split(datamodule: Any) -> tuple[np.ndarray, np.ndarray]:
    """The whole test split as float32 images in [0, 1] (what every shipped file takes) and labels, as numpy."""
    from project.compression.export import as_unit_float

    datamodule.prepare_data()
    datamodule.setup("test")
    images, labels = [], []
    for batch in datamodule.test_dataloader():
        images.append(as_unit_float(batch[0]).cpu())
        labels.append(batch[1].cpu())
    return torch.cat(images).numpy(), torch.cat(labels).numpy()
