"""``ImageFolderDataModule``: your own images in ``train/<class>/*`` and ``test/<class>/*`` folders."""

from pathlib import Path

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


class ImageFolderDataModule(InMemoryDataModule):
    """Images in ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (jpg, png, gif, webp).

    Classes are the sorted folder names of ``train/``; images are resized to
    ``image_size`` x ``image_size``. Files with other suffixes are ignored.

    Args:
        data_dir: Folder with ``train/`` and ``test/``, each holding one folder per class.
        image_size: Height and width images are resized to.
        channels: 3 for RGB, 1 for grayscale (images are converted on decoding).
        in_memory: Decode every image once into memory and train from there (fast for small
            images such as a CIFAR-10 JPEG folder); otherwise decode on the fly in workers.
        num_workers: DataLoader worker processes for decoding.
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
        mean: Per-channel pixel mean in [0, 1]; None = 0.5 for every channel.
        std: Per-channel pixel standard deviation in [0, 1]; None = 0.5 for every channel.
    """

    def __init__(
        self,
        data_dir: str,
        image_size: int = 32,
        channels: int = 3,
        in_memory: bool = False,
        num_workers: int = 2,
        batch_size: int = 128,
        val_size: int | float = 0.1,
        seed: int = 0,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        rotate_degrees: float = 0.0,
        translate: float = 0.0,
        scale: tuple[float, float] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if image_size < 1 or num_workers < 0:
            raise UserError(f"need image_size >= 1 and num_workers >= 0, got {image_size} and {num_workers}")
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
            mean=mean if mean is not None else (0.5,) * channels,
            std=std if std is not None else (0.5,) * channels,
        )
        self.data_dir = Path(data_dir)
        self.channels, self.in_memory, self.num_workers = channels, in_memory, num_workers
        self._in_channels, self._image_size = channels, image_size
        self._check_channels()
        train_dir = self.data_dir / "train"
        if not train_dir.is_dir():
            raise UserError(f"{train_dir.resolve()} not found: data_dir needs train/<class>/ and test/<class>/ folders")
        self.class_names = list_classes(train_dir)
        if not self.class_names:
            raise UserError(f"{train_dir.resolve()} has no class folders: put each class's images in train/<class>/")
        self._train_items = list_images(train_dir, self.class_names)
        self._num_classes = len(self.class_names)
        test_dir = self.data_dir / "test"
        if test_dir.is_dir() and (test_classes := list_classes(test_dir)) != self.class_names:
            raise UserError(
                f"test/ classes {test_classes} differ from train/ classes {self.class_names}:"
                " give both the same class folders"
            )
        self._datasets: dict[str, ImageFiles] = {}
        self.save_hyperparameters()

    def _test_items(self) -> list[Item]:
        test_dir = self.data_dir / "test"
        if not test_dir.is_dir():
            raise UserError(f"{test_dir.resolve()} not found: add test/<class>/ folders to test or predict")
        return list_images(test_dir, self.class_names)

    # --- in memory: decode everything once, then the base class's fast path ---

    def _decode_all(self, items: list[Item], what: str) -> Split:
        from tqdm import tqdm

        dataset = ImageFiles(items, self.channels, self.image_size, errors_as_values=True)
        workers = self.num_workers if len(items) >= 1000 else 0  # starting workers costs more than tiny sets
        loader = DataLoader(dataset, batch_size=512, num_workers=workers)
        images, labels = [], []
        show = len(items) >= 1000 and (self.trainer is None or self.trainer.is_global_zero)
        progress = tqdm(loader, desc=f"decoding {what} images", disable=not show, mininterval=2.0)
        for batch_images, batch_labels, errors in progress:
            if bad := [e for e in errors if e]:
                raise UserError(bad[0])
            images.append(batch_images)
            labels.append(batch_labels)
        return torch.cat(images), torch.cat(labels).long()

    def _load(self, train: bool) -> Split:
        if train:
            return self._decode_all(self._train_items, "train")
        return self._decode_all(self._test_items(), "test")

    # --- streaming: per-image decoding in DataLoader workers ---

    def setup(self, stage: str | None = None) -> None:
        if self.in_memory:
            super().setup(stage)
            return
        if stage in (None, "fit", "validate") and "train" not in self._datasets:
            train_idx, val_idx = split_indices(len(self._train_items), self.val_size, self.seed)
            for name, index in (("train", train_idx), ("val", val_idx)):
                self._datasets[name] = ImageFiles([self._train_items[i] for i in index], self.channels, self.image_size)
        if stage in (None, "test", "predict") and "test" not in self._datasets:
            self._datasets["test"] = ImageFiles(self._test_items(), self.channels, self.image_size)

    def _dataloader(self, name: str, train: bool) -> DataLoader:
        if name not in self._datasets:
            raise RuntimeError(f"call setup() before asking for the {name} dataloader")
        return DataLoader(
            self._datasets[name],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def train_dataloader(self) -> InMemoryLoader | DataLoader:
        return super().train_dataloader() if self.in_memory else self._dataloader("train", train=True)

    def val_dataloader(self) -> InMemoryLoader | DataLoader | list:
        if self.in_memory:
            return super().val_dataloader()
        if "val" in self._datasets and len(self._datasets["val"]) == 0:
            return []  # val_size 0: no validation
        return self._dataloader("val", train=False)

    def test_dataloader(self) -> InMemoryLoader | DataLoader:
        return super().test_dataloader() if self.in_memory else self._dataloader("test", train=False)

    def predict_dataloader(self) -> InMemoryLoader | DataLoader:
        return super().predict_dataloader() if self.in_memory else self._dataloader("test", train=False)
