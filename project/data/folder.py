"""``ImageFolderDataModule``: your own images in ``train/<class>/*`` and ``test/<class>/*`` folders."""

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import resize

from project.data.base import InMemoryDataModule, Split, split_indices
from project.data.loader import InMemoryLoader
from project.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}
Item = tuple[Path, int]


def list_classes(split_dir: Path) -> list[str]:
    """Sorted names of the class folders in ``split_dir``."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(split_dir: Path, classes: list[str]) -> list[Item]:
    """``(file, class index)`` for every image under ``split_dir/<class>/``; an empty class is an error."""
    items: list[Item] = []
    for index, name in enumerate(classes):
        folder = split_dir / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(
                f"class folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): add some or remove it"
            )
        items.extend((f, index) for f in files)
    return items


def decode_file(path: Path, channels: int, size: int) -> Tensor:
    """One image file as uint8 ``[channels, size, size]``."""
    try:
        image = decode_image(str(path), mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
    except Exception as err:  # torchvision raises RuntimeError/ValueError depending on the codec
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path} could not be decoded as an image ({reason}): remove or replace the file") from None
    if image.shape[-2:] != (size, size):
        image = resize(image, [size, size], antialias=True)
    return image


class ImageFiles(Dataset):
    """Decodes ``items`` one by one (in DataLoader workers) into uint8 tensors of one size.

    With ``errors_as_values`` a bad file yields its error message instead of raising, so the
    main process can raise a clean one-line ``UserError`` (a worker's exception arrives wrapped).
    """

    def __init__(self, items: list[Item], channels: int, size: int, errors_as_values: bool = False) -> None:
        self.items, self.channels, self.size = items, channels, size
        self.errors_as_values = errors_as_values

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple:
        path, label = self.items[index]
        if not self.errors_as_values:
            return decode_file(path, self.channels, self.size), label
        try:
            return decode_file(path, self.channels, self.size), label, ""
        except UserError as err:
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), label, str(err)


def decode_all(items: list[Item], channels: int, size: int, num_workers: int, what: str, show: bool) -> Split:
    """Every image of ``items`` as one uint8 ``[N, channels, size, size]`` tensor, and the labels."""
    from tqdm import tqdm

    dataset = ImageFiles(items, channels, size, errors_as_values=True)
    workers = num_workers if len(items) >= 1000 else 0  # starting workers costs more than tiny sets
    loader = DataLoader(dataset, batch_size=512, num_workers=workers)
    images, labels = [], []
    progress = tqdm(loader, desc=f"decoding {what} images", disable=not (show and len(items) >= 1000), mininterval=2.0)
    for batch_images, batch_labels, errors in progress:
        if bad := [e for e in errors if e]:
            raise UserError(bad[0])
        images.append(batch_images)
        labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels).long()


class StreamingSplits:
    """The ``in_memory=False`` path of an :class:`ImageFolderDataModule`: its splits as Datasets of
    files, decoded image by image in DataLoader workers.

    The loaders yield the same uint8 batches as the in-memory path; the DataModule's
    ``on_after_batch_transfer`` augments and normalises both alike.
    """

    def __init__(self, dm: "ImageFolderDataModule") -> None:
        self.dm = dm
        self.datasets: dict[str, ImageFiles] = {}

    def _files(self, items: list[Item]) -> ImageFiles:
        return ImageFiles(items, self.dm.channels, self.dm.image_size)

    def setup(self, stage: str | None) -> None:
        """Index what ``stage`` needs, once; the validation split is the in-memory path's."""
        dm = self.dm
        if stage in (None, "fit", "validate") and "train" not in self.datasets:
            train_idx, val_idx = split_indices(len(dm.train_items), dm.val_size, dm.seed)
            for name, index in (("train", train_idx), ("val", val_idx)):
                self.datasets[name] = self._files([dm.train_items[i] for i in index])
        if stage in (None, "test", "predict") and "test" not in self.datasets:
            self.datasets["test"] = self._files(dm.test_items())

    def loader(self, name: str, train: bool) -> DataLoader | list:
        if name not in self.datasets:
            raise RuntimeError(f"call setup() before asking for the {name} dataloader")
        if name == "val" and len(self.datasets[name]) == 0:
            return []  # val_size 0: no validation
        dm = self.dm
        return DataLoader(
            self.datasets[name],
            batch_size=dm.batch_size if train else dm.eval_batch_size,
            shuffle=train,
            drop_last=dm.drop_last and train,
            num_workers=dm.num_workers,
            persistent_workers=dm.num_workers > 0,
            generator=torch.Generator().manual_seed(dm.seed) if train else None,
        )


class ImageFolderDataModule(InMemoryDataModule):
    """Images in ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (jpg, png, gif, webp).

    Classes are the sorted folder names of ``train/``; images are resized to
    ``image_size`` x ``image_size``. Files with other suffixes are ignored. The batch, split,
    augmentation and normalisation arguments are those of
    :class:`~project.data.base.InMemoryDataModule`; ``val_size`` is a tenth of ``train/``.

    Args:
        data_dir: Folder with ``train/`` and ``test/``, each holding one folder per class.
        image_size: Height and width images are resized to.
        channels: 3 for RGB, 1 for grayscale (images are converted on decoding).
        in_memory: Decode every image once into memory and train from there (fast for small
            images such as a CIFAR-10 JPEG folder); otherwise decode on the fly in workers.
        num_workers: DataLoader worker processes for decoding.
    """

    arg_defaults = {"val_size": 0.1}

    def __init__(
        self,
        data_dir: str,
        image_size: int = 32,
        channels: int = 3,
        in_memory: bool = False,
        num_workers: int = 2,
        **kwargs: Any,
    ) -> None:
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if image_size < 1 or num_workers < 0:
            raise UserError(f"need image_size >= 1 and num_workers >= 0, got {image_size} and {num_workers}")
        self.data_dir = Path(data_dir)
        self.image_size, self.channels, self.in_memory, self.num_workers = image_size, channels, in_memory, num_workers
        train_dir = self.data_dir / "train"
        if not train_dir.is_dir():
            raise UserError(f"{train_dir.resolve()} not found: data_dir needs train/<class>/ and test/<class>/ folders")
        self.class_names = list_classes(train_dir)
        if not self.class_names:
            raise UserError(f"{train_dir.resolve()} has no class folders: put each class's images in train/<class>/")
        self.train_items = list_images(train_dir, self.class_names)
        test_dir = self.data_dir / "test"
        if test_dir.is_dir() and (test_classes := list_classes(test_dir)) != self.class_names:
            raise UserError(
                f"test/ classes {test_classes} differ from train/ classes {self.class_names}:"
                " give both the same class folders"
            )
        super().__init__(**kwargs)
        self._streaming = None if in_memory else StreamingSplits(self)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return self.channels

    def test_items(self) -> list[Item]:
        test_dir = self.data_dir / "test"
        if not test_dir.is_dir():
            raise UserError(f"{test_dir.resolve()} not found: add test/<class>/ folders to test or predict")
        return list_images(test_dir, self.class_names)

    # --- one of two paths, chosen by in_memory ---

    def setup(self, stage: str | None = None) -> None:
        if self._streaming is None:
            super().setup(stage)  # the base class's uint8 fast path, loading through _load
        else:
            self._streaming.setup(stage)

    def _loader(self, name: str, train: bool) -> InMemoryLoader | DataLoader | list:
        if self._streaming is None:
            return super()._loader(name, train)
        return self._streaming.loader(name, train)

    # --- in memory: decode everything once ---

    def _load(self, train: bool) -> Split:
        items = self.train_items if train else self.test_items()
        show = self.trainer is None or self.trainer.is_global_zero
        return decode_all(items, self.channels, self.image_size, self.num_workers, "train" if train else "test", show)
