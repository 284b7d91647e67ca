"""Toy data, a quiet CPU Trainer, a small classifier and a teacher checkpoint, shared by the tests and by
the scripts they run in fresh processes (``from tests.toys import ...``). Not a test module.

Every dataset here is seeded: the same call gives the same tensors, so the thresholds of the tests that
train on them hold run after run.
"""

import importlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning import Callback, LightningDataModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader, TensorDataset

from project.tasks.classifier import ImageClassifier
from tests.fakes import patterned_images

# ---- data ------------------------------------------------------------------------------------------------


def blocks(n: int, seed: int, channels: int = 1, size: int = 28, classes: int = 4) -> TensorDataset:
    """Images whose class is the horizontal band that is brighter: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, channels, size, size, generator=g) * 0.5
    band = size // classes
    for c in range(classes):
        x[y == c, :, c * band : (c + 1) * band, :] += 2.5
    return TensorDataset(x, y)


def block_loaders(
    channels: int = 1, size: int = 28, n: int = 256, shuffle: bool = True
) -> tuple[DataLoader, DataLoader]:
    """Training (``n`` images, seed 0) and validation (64 images, seed 1) loaders of :func:`blocks`, batch 32."""
    train = DataLoader(blocks(n, 0, channels, size), batch_size=32, shuffle=shuffle)
    val = DataLoader(blocks(64, 1, channels, size), batch_size=32)
    return train, val


def random_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """``n`` random 1x28x28 images with random labels of 10 classes (nothing to learn), not shuffled."""
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


class LoaderData(LightningDataModule):
    """Ready-made loaders as a DataModule whose images are already what the network takes (mean 0, std 1),
    so a program exported from the run computes exactly what the network does."""

    mean, std = (0.0,), (1.0,)

    def __init__(self, train, val=None) -> None:
        super().__init__()
        self._train, self._val = train, val

    def train_dataloader(self):
        return self._train

    def val_dataloader(self):
        return self._val if self._val is not None else []


class PatternedData(L.LightningDataModule):
    """Learnable 10-class patterned images (1x28x28, :func:`tests.fakes.patterned_images` with seed 3),
    already normalised, in plain DataLoaders: the training ones shuffled, the validation ones also for test."""

    mean, std = (0.0,), (1.0,)  # what an exported program applies: nothing, the images are normalised already

    def __init__(self, n_train: int = 256, n_val: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        x, y = patterned_images(n_train + n_val, 10, (1, 28, 28), seed=3)
        self.x = (torch.from_numpy(x).float() / 255 - 0.5) / 0.3
        self.y = torch.from_numpy(y)
        self.n_train, self.batch_size = n_train, batch_size

    def train_dataloader(self) -> DataLoader:
        ds = TensorDataset(self.x[: self.n_train], self.y[: self.n_train])
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[self.n_train :], self.y[self.n_train :]), batch_size=64)

    test_dataloader = val_dataloader


class Blobs(LightningDataModule):
    """Learnable random data: class-dependent mean + noise, 1x8x8, no shuffling (runs are reproducible)."""

    def __init__(self, num_classes: int = 3, n: int = 96, batch_size: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % num_classes
        self.x = torch.randn(n, 1, 8, 8, generator=g) + self.y.view(-1, 1, 1, 1).float()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:32], self.y[:32]), batch_size=32)


# ---- Trainer -----------------------------------------------------------------------------------------------


def cpu_trainer(
    root: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    *,
    logger: Logger | bool | str = False,
    **kwargs: Any,
) -> Trainer:
    """A Trainer on the CPU without progress bar or model summary.

    Args:
        root: ``default_root_dir`` (``None``: the working directory, as Lightning has it).
        callbacks: The run's callbacks.
        logger: A logger; ``True`` for Lightning's default one (TensorBoard under ``root``), ``False`` for none,
            ``"csv"`` for a ``CSVLogger`` under ``root``.
        **kwargs: Any other Trainer argument. They override the defaults: one device, no checkpointing,
            no sanity-check validation.
    """
    if isinstance(logger, str):
        if logger != "csv":
            raise ValueError(f"logger must be a Logger, a bool or 'csv', got {logger!r}")
        logger = CSVLogger(root)
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return Trainer(default_root_dir=root, callbacks=list(callbacks), logger=logger, **{**defaults, **kwargs})


# ---- models --------------------------------------------------------------------------------------------------

TINY_CNN = {"arch": "cnn", "arch_kwargs": {"channels": [4, 8], "hidden": 16}, "in_channels": 1, "image_size": 8}
"""The ``ImageClassifier`` arguments of a CNN small enough for :class:`Blobs` (1x8x8)."""

SGD_MOMENTUM = partial(torch.optim.SGD, lr=0.1, momentum=0.9)


def toy_classifier(
    num_classes: int = 4,
    arch: str = "lenet5",
    in_channels: int = 1,
    image_size: int = 28,
    optimizer: Callable | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """An ImageClassifier for the toy data. The defaults fit :func:`blocks`: a 4-class LeNet-5 on 1x28x28
    images, trained with AdamW at lr 5e-3 (``optimizer=None``); ``kwargs`` go to ImageClassifier."""
    if optimizer is None:
        optimizer = partial(torch.optim.AdamW, lr=5e-3)
    return ImageClassifier(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, arch=arch, optimizer=optimizer,
        **kwargs,
    )


def write_teacher_checkpoint(
    path: str | Path,
    arch: str = "lenet5",
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    arch_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """A randomly initialised teacher, saved with the keys a ``fit`` checkpoint has (state_dict, hyper_parameters)."""
    torch.manual_seed(seed)
    model = ImageClassifier(num_classes, in_channels, image_size, arch=arch, arch_kwargs=arch_kwargs)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so "unchanged" means something
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def teacher_overrides(config: Path, directory: Path) -> list[str]:
    """For a config whose model has a ``teacher_checkpoint``: the override pointing it at a random small
    teacher that fits the config's data, written into ``directory``. ``[]`` for every other config."""
    cfg = yaml.safe_load(Path(config).read_text()) or {}
    if not ((cfg.get("model") or {}).get("init_args") or {}).get("teacher_checkpoint"):
        return []
    data = cfg["data"]
    module, name = data["class_path"].rsplit(".", 1)
    datamodule = getattr(importlib.import_module(module), name)(**(data.get("init_args") or {}))
    path = write_teacher_checkpoint(
        Path(directory) / "teacher.ckpt", "mlp", datamodule.num_classes, datamodule.in_channels,
        datamodule.image_size, {"hidden": [16]},
    )
    return [f"--model.init_args.teacher_checkpoint={path}"]
