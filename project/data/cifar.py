"""CIFAR-10 and CIFAR-100 from torchvision's python-pickle batches, read with a restricted unpickler."""

from pathlib import Path

import numpy as np
import torch

from project.data.base import InMemoryDataModule, Split
from project.data.download import missing_data_error, try_download
from project.data.safe_pickle import load_cifar_batch
from project.errors import UserError


class _CIFARDataModule(InMemoryDataModule):
    """Shared reader; subclasses set the folder, file names and label key."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    classes_count: int
    dataset_name: str
    torchvision_class: str

    def _init_cifar(self, data_dir: str, download: bool) -> None:
        self.data_dir = Path(data_dir)
        self.download = download
        self._num_classes = self.classes_count
        self._in_channels = 3
        self._image_size = 32
        self._check_channels()

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
        ok = ok and all(isinstance(y, int) and 0 <= y < self.classes_count for y in labels)
        if not ok:
            raise UserError(
                f"{path} lacks uint8 b'data' [N, 3072] with matching {self.label_key!r} labels"
                f" in 0..{self.classes_count - 1}: delete it and download it again"
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
    """CIFAR-10 (Krizhevsky, 2009): 50,000 train / 10,000 test colour images, 3x32x32, 10 classes.

    Args:
        data_dir: Folder holding ``cifar-10-batches-py/`` (torchvision's layout); downloaded
            there when missing and ``download`` is true.
        download: Download CIFAR-10 (torchvision's URL and checksum) when the files are missing.
        batch_size: Training batch size (per process under DDP).
        val_size: Training images held out for validation: a count, or a fraction in [0, 1);
            0 disables validation.
        seed: Seed of the validation split and the shuffle.
        eval_batch_size: Batch size for validation, test and predict; defaults to ``batch_size``.
        drop_last: Drop the incomplete last training batch.
        crop_padding: Random-crop augmentation padding in pixels (0 = off).
        horizontal_flip: Random left-right flips with probability 0.5.
        rotate_degrees: Random rotation range in degrees (0 = off).
        translate: Random shift as a fraction of the image size (0 = off).
        scale: Random zoom range ``[low, high]`` (None = off).
        mean: Per-channel pixel mean in [0, 1] for normalisation.
        std: Per-channel pixel standard deviation in [0, 1] for normalisation.
    """

    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = b"labels"
    classes_count = 10
    dataset_name = "CIFAR-10"
    torchvision_class = "CIFAR10"

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        batch_size: int = 256,
        val_size: int | float = 5000,
        seed: int = 0,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        crop_padding: int = 4,
        horizontal_flip: bool = True,
        rotate_degrees: float = 0.0,
        translate: float = 0.0,
        scale: tuple[float, float] | None = None,
        mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465),
        std: tuple[float, ...] = (0.2470, 0.2435, 0.2616),
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_size=val_size,
            seed=seed,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
            crop_padding=crop_padding,
            horizontal_flip=horizontal_flip,
            rotate_degrees=rotate_degrees,
            translate=translate,
            scale=scale,
            mean=mean,
            std=std,
        )
        self._init_cifar(data_dir, download)
        self.save_hyperparameters()


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (Krizhevsky, 2009): 50,000 train / 10,000 test colour images, 3x32x32, 100 fine classes.

    Args:
        data_dir: Folder holding ``cifar-100-python/`` (torchvision's layout); downloaded there
            when missing and ``download`` is true.
        download: Download CIFAR-100 (torchvision's URL and checksum) when the files are missing.
        batch_size: Training batch size (per process under DDP).
        val_size: Training images held out for validation: a count, or a fraction in [0, 1);
            0 disables validation.
        seed: Seed of the validation split and the shuffle.
        eval_batch_size: Batch size for validation, test and predict; defaults to ``batch_size``.
        drop_last: Drop the incomplete last training batch.
        crop_padding: Random-crop augmentation padding in pixels (0 = off).
        horizontal_flip: Random left-right flips with probability 0.5.
        rotate_degrees: Random rotation range in degrees (0 = off).
        translate: Random shift as a fraction of the image size (0 = off).
        scale: Random zoom range ``[low, high]`` (None = off).
        mean: Per-channel pixel mean in [0, 1] for normalisation.
        std: Per-channel pixel standard deviation in [0, 1] for normalisation.
    """

    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = b"fine_labels"
    classes_count = 100
    dataset_name = "CIFAR-100"
    torchvision_class = "CIFAR100"

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        batch_size: int = 256,
        val_size: int | float = 5000,
        seed: int = 0,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        crop_padding: int = 4,
        horizontal_flip: bool = True,
        rotate_degrees: float = 0.0,
        translate: float = 0.0,
        scale: tuple[float, float] | None = None,
        mean: tuple[float, ...] = (0.5071, 0.4865, 0.4409),
        std: tuple[float, ...] = (0.2673, 0.2564, 0.2762),
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_size=val_size,
            seed=seed,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
            crop_padding=crop_padding,
            horizontal_flip=horizontal_flip,
            rotate_degrees=rotate_degrees,
            translate=translate,
            scale=scale,
            mean=mean,
            std=std,
        )
        self._init_cifar(data_dir, download)
        self.save_hyperparameters()
