"""CIFAR-10 and CIFAR-100 from torchvision's python-pickle batches, read with a restricted unpickler."""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from project.data.base import InMemoryDataModule, Split
from project.data.download import missing_data_error, try_download
from project.data.safe_pickle import load_cifar_batch
from project.errors import UserError


class _CIFARDataModule(InMemoryDataModule):
    """Shared reader of CIFAR-10 and CIFAR-100; subclasses set the folder, file names and label key.

    The batch, split, augmentation and normalisation arguments are those of
    :class:`~project.data.base.InMemoryDataModule`, with CIFAR's defaults: batch 256, random crops
    (padding 4) and flips, and the dataset's own mean and std.

    Args:
        data_dir: Folder holding torchvision's batch folder (``cifar-10-batches-py/`` or
            ``cifar-100-python/``); downloaded there when missing and ``download`` is true.
        download: Download the dataset (torchvision's URL and checksum) when the files are missing.
    """

    arg_defaults = {"batch_size": 256, "crop_padding": 4, "horizontal_flip": True}
    in_channels = 3
    image_size = 32
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    dataset_name: str
    torchvision_class: str

    def __init__(self, data_dir: str = "data", download: bool = True, **kwargs: Any) -> None:
        self.data_dir = Path(data_dir)
        self.download = download
        super().__init__(**kwargs)

    @property
    def batches_dir(self) -> Path:
        return self.data_dir / self.folder

    def _missing(self) -> list[str]:
        return [f for f in (*self.train_files, *self.test_files) if not (self.batches_dir / f).is_file()]

    def prepare_data(self) -> None:
        """Download and extract the archive with torchvision when batch files are missing."""
        if not self._missing():
            return
        reason = "download=False"
        if self.download:
            import torchvision
            from torchvision.datasets.utils import download_and_extract_archive

            # The archive URL and checksum from torchvision's class; extracting ourselves avoids its
            # unrestricted pickle.load of the batches.
            cls = getattr(torchvision.datasets, self.torchvision_class)

            def fetch() -> None:
                download_and_extract_archive(cls.url, str(self.data_dir), filename=cls.filename, md5=cls.tgz_md5)

            reason = try_download(fetch)
        if self._missing():
            raise self._not_found(reason or "the download left files missing")

    def _not_found(self, reason: str) -> UserError:
        files = ", ".join(self.train_files + self.test_files)
        return missing_data_error(self.dataset_name, self.batches_dir, reason, f"the batch files ({files})")

    def _read_batch(self, path: Path) -> Split:
        batch = load_cifar_batch(path)
        data, labels = batch.get(b"data"), batch.get(self.label_key)
        ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
        ok = ok and isinstance(labels, list) and len(labels) == len(data)
        ok = ok and all(isinstance(y, int) and 0 <= y < self.num_classes for y in labels)
        if not ok:
            raise UserError(
                f"{path} lacks uint8 b'data' [N, 3072] with matching {self.label_key!r} labels"
                f" in 0..{self.num_classes - 1}: delete it and download it again"
            )
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        return images, torch.tensor(labels, dtype=torch.long)

    def _load(self, train: bool) -> Split:
        names = self.train_files if train else self.test_files
        if any(not (self.batches_dir / n).is_file() for n in names):
            raise self._not_found("prepare_data() did not run" if self.download else "download=False")
        parts = [self._read_batch(self.batches_dir / n) for n in names]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (Krizhevsky, 2009): 50,000 train / 10,000 test colour images, 3x32x32, 10 classes."""

    arg_defaults = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}
    num_classes = 10
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = b"labels"
    dataset_name = "CIFAR-10"
    torchvision_class = "CIFAR10"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (Krizhevsky, 2009): 50,000 train / 10,000 test colour images, 3x32x32, 100 fine classes."""

    arg_defaults = {"mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)}
    num_classes = 100
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = b"fine_labels"
    dataset_name = "CIFAR-100"
    torchvision_class = "CIFAR100"
