"""MNIST: the IDX files, sizes, class subsets, few-shot samples, the shipped sample and the real data."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from project.data import (
    MNISTDataModule,
    MNISTSampleDataModule,
)
from project.data.idx import read_idx, write_idx
from project.errors import UserError
from tests import fakes
from tests.data.conftest import SHARED_DATA, mnist


def test_mnist_sizes_shapes_and_dtypes(mnist_dir: Path) -> None:
    dm = mnist(mnist_dir, batch_size=32)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    assert len(dm._train[1]) == 250 and len(dm._val[1]) == 50 and len(dm._test[1]) == 70
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert len(dm.train_dataloader()) == 8 and len(dm.val_dataloader()) == 2 and len(dm.test_dataloader()) == 3
    assert sum(len(b[1]) for b in dm.predict_dataloader()) == 70


def test_mnist_classes_are_reindexed_in_the_given_order(mnist_dir: Path) -> None:
    full = mnist(mnist_dir, val_size=0)
    dm = mnist(mnist_dir, val_size=0, classes=[7, 2])
    assert dm.num_classes == 2
    assert torch.equal(dm._train[1], (full._train[1][(full._train[1] == 7) | (full._train[1] == 2)] == 2).long())
    assert torch.equal(dm._test[1].unique(), torch.tensor([0, 1]))
    with pytest.raises(UserError, match="distinct digits"):
        MNISTDataModule(data_dir=str(mnist_dir), classes=[1, 1])


def test_mnist_samples_per_class_is_balanced_seeded_and_before_the_split(mnist_dir: Path) -> None:
    dm = mnist(mnist_dir, samples_per_class=5, val_size=10)
    labels = torch.cat([dm._train[1], dm._val[1]])
    assert torch.equal(labels.bincount(), torch.full((10,), 5))
    assert len(dm._test[1]) == 70  # test split untouched
    again = mnist(mnist_dir, samples_per_class=5, val_size=10)
    other = mnist(mnist_dir, samples_per_class=5, val_size=10, seed=1)
    assert torch.equal(again._train[0], dm._train[0]) and not torch.equal(other._train[0], dm._train[0])
    with pytest.raises(UserError, match="val_size 60 .* 50 training images"):
        mnist(mnist_dir, samples_per_class=5, val_size=60)
    with pytest.raises(UserError, match="fewer than samples_per_class 1000"):
        mnist(mnist_dir, samples_per_class=1000)


def test_idx_roundtrip_and_corrupt_files(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        assert torch.equal(read_idx(write_idx(tmp_path / name, array)), torch.from_numpy(array))
    good = (tmp_path / "a.idx").read_bytes()
    cases = {"short": good[:-3], "magic": b"\x01" + good[1:], "code": good[:2] + b"\x42" + good[3:]}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(UserError, match=rf"{name} is not a valid IDX file .*delete it"):
            read_idx(path)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(UserError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz")


def test_truncated_mnist_file_is_a_user_error(tmp_path: Path) -> None:
    root = fakes.write_fake_mnist(tmp_path, n_train=20, n_test=10, gz=True)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    dm = MNISTDataModule(data_dir=str(root), download=False, val_size=0)
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz is not a valid IDX file .*truncated"):
        dm.setup("fit")


def test_missing_mnist_is_a_one_line_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError) as info:
        MNISTDataModule(data_dir=str(tmp_path), download=False).prepare_data()
    message = str(info.value)
    assert "\n" not in message and str(tmp_path.resolve() / "MNIST" / "raw") in message
    assert "download=False" in message and "--data.data_dir" in message

    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz\nmore lines")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(UserError, match=r"could not be downloaded \(RuntimeError: Error downloading") as info:
        MNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()
    assert "\n" not in str(info.value)


def test_mnist_sample_loads_offline() -> None:
    dm = MNISTSampleDataModule(batch_size=100)
    dm.prepare_data()
    dm.setup()
    assert len(dm._train[1]) == 5500 and len(dm._val[1]) == 500 and len(dm._test[1]) == 1000
    assert torch.equal(torch.cat([dm._train[1], dm._val[1]]).bincount(), torch.full((10,), 600))
    assert dm._train[0].float().mean().div(255).item() == pytest.approx(0.13, abs=0.01)  # real digits


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="real MNIST not present")
def test_real_mnist_reads_60000_and_10000() -> None:
    dm = MNISTDataModule(data_dir=str(SHARED_DATA), download=False, val_size=5000)
    dm.prepare_data()
    dm.setup()
    assert len(dm._train[1]) + len(dm._val[1]) == 60000 and len(dm._test[1]) == 10000
    assert dm._test[1].bincount().tolist()[:2] == [980, 1135]
