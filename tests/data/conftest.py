"""Fixtures and helpers shared by the DataModule tests: a fake MNIST and a fake image folder, in the real formats."""

from pathlib import Path

import pytest
import torch

from project.data import MNISTDataModule
from tests import fakes
from tests.conftest import REPO, SHARED_DATA

LENET = str(REPO / "configs" / "mnist_lenet.yaml")
__all__ = ["LENET", "SHARED_DATA", "image_keys", "mnist"]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fakes.write_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=300, n_test=70)


def mnist(mnist_dir: Path, **kwargs) -> MNISTDataModule:
    kwargs.setdefault("val_size", 50)
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def image_keys(images: torch.Tensor) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in images}


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    return fakes.write_fake_image_folder(root, classes=("cat", "dog", "fox"), n_per_class=10, size=20)
