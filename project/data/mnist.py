"""MNIST: the full dataset (downloaded by torchvision when missing) and the small sample shipped here."""

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from project.data.base import InMemoryDataModule, Split
from project.data.download import missing_data_error, try_download
from project.data.idx import read_idx
from project.errors import UserError

__all__ = ["MNISTDataModule", "MNISTSampleDataModule", "read_idx"]

FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SAMPLE_DIR = Path(__file__).resolve().parent / "assets" / "mnist_sample"


def find_raw_file(raw_dir: Path, name: str) -> Path | None:
    """``raw_dir/name``, else ``raw_dir/name.gz``, else None."""
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


class MNISTDataModule(InMemoryDataModule):
    """MNIST handwritten digits, 1x28x28, held in memory (on the GPU when training there).

    The batch, split, augmentation and normalisation arguments are those of
    :class:`~project.data.base.InMemoryDataModule`, with MNIST's mean and std as defaults.

    Args:
        data_dir: Folder holding ``MNIST/raw/`` with the four IDX files (torchvision's layout,
            plain or ``.gz``); downloaded there when missing and ``download`` is true.
        download: Download MNIST with torchvision when the files are missing.
        classes: Keep only these digits, relabelled 0..k-1 in the order given
            (e.g. ``[3, 8]`` makes a binary 3-vs-8 task); None keeps all ten.
        samples_per_class: Keep this many training images per class, drawn with ``seed`` before
            the validation split (few-shot experiments); None keeps all.
    """

    arg_defaults = {"mean": (0.1307,), "std": (0.3081,)}
    in_channels = 1
    image_size = 28

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        classes: list[int] | None = None,
        samples_per_class: int | None = None,
        **kwargs: Any,
    ) -> None:
        if classes is not None:
            classes = [int(c) for c in classes]
            if not classes or len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
                raise UserError(f"classes must be distinct digits 0..9, got {classes}")
        if samples_per_class is not None and samples_per_class < 1:
            raise UserError(f"samples_per_class must be >= 1 (or null for all), got {samples_per_class}")
        self.data_dir = Path(data_dir)
        self.download = download
        self.classes = classes
        self.samples_per_class = samples_per_class
        super().__init__(**kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else 10

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "MNIST" / "raw"

    def _missing(self) -> list[str]:
        return [name for names in FILES.values() for name in names if find_raw_file(self.raw_dir, name) is None]

    def prepare_data(self) -> None:
        """Download MNIST with torchvision when files are missing (and ``download`` is true)."""
        if not self._missing():
            return
        reason = "download=False"
        if self.download:
            import torchvision

            reason = try_download(lambda: torchvision.datasets.MNIST(str(self.data_dir), train=True, download=True))
        if self._missing():
            raise self._not_found(reason or "the download left files missing")

    def _not_found(self, reason: str) -> UserError:
        return missing_data_error("MNIST", self.raw_dir, reason, "the four IDX files")

    def _read(self, train: bool) -> Split:
        paths = [find_raw_file(self.raw_dir, name) for name in FILES[train]]
        if None in paths:
            raise self._not_found("prepare_data() did not run" if self.download else "download=False")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        shapes_ok = images.dtype == torch.uint8 and images.shape[1:] == (28, 28) and labels.ndim == 1
        if not shapes_ok or len(images) != len(labels) or (len(labels) and int(labels.max()) > 9):
            raise UserError(
                f"{paths[0]} and {paths[1]} do not hold matching uint8 images [N, 28, 28] and digit labels [N]:"
                " delete them and download them again"
            )
        return images.unsqueeze(1), labels.long()

    def _load(self, train: bool) -> Split:
        images, labels = self._read(train)
        if self.classes is not None:
            keep = torch.isin(labels, torch.tensor(self.classes))
            images, labels = images[keep], labels[keep]
            relabel = torch.full((256,), -1, dtype=torch.long)  # IDX labels are uint8
            relabel[torch.tensor(self.classes)] = torch.arange(len(self.classes))
            labels = relabel[labels]
        if train and self.samples_per_class is not None:
            keep = self._per_class_subset(labels)
            images, labels = images[keep], labels[keep]
        return images, labels

    def _per_class_subset(self, labels: Tensor) -> Tensor:
        """Sorted indices of ``samples_per_class`` images of each class, drawn with ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        chosen = []
        for c in range(self.num_classes):
            members = (labels == c).nonzero().flatten()
            if len(members) < self.samples_per_class:
                raise UserError(
                    f"class {c} has {len(members)} training images, fewer than samples_per_class"
                    f" {self.samples_per_class}: lower samples_per_class"
                )
            chosen.append(members[torch.randperm(len(members), generator=generator)[: self.samples_per_class]])
        return torch.cat(chosen).sort().values


class MNISTSampleDataModule(MNISTDataModule):
    """A class-balanced real MNIST sample shipped with the package (6,000 train / 1,000 test): works offline.

    MNIST by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, CC BY-SA 3.0. The arguments
    are those of :class:`MNISTDataModule` but ``data_dir`` and ``download``; ``val_size`` is 500.
    """

    arg_defaults = {"val_size": 500}
    fixed_args = {"data_dir": str(SAMPLE_DIR), "download": False}

    def _not_found(self, reason: str) -> UserError:
        return UserError(
            f"the MNIST sample shipped in {self.raw_dir} is missing: reinstall the package"
            " (pip install -e .) or use project.data.MNISTDataModule"
        )
