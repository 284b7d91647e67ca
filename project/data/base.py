"""``InMemoryDataModule``: the base of every DataModule here, and the one place batches are augmented.

Loaders yield uint8 images ``[B, C, H, W]`` and int64 labels. ``on_after_batch_transfer`` (on
the training device, after Lightning moved the batch) turns them into float, augments them
when the trainer is training, and normalises them with the dataset's mean and std.
"""

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from lightning import LightningDataModule
from torch import Tensor

from project.data import augment as aug
from project.data.loader import InMemoryLoader
from project.data.signature import complete_init
from project.errors import UserError

Split = tuple[Tensor, Tensor]


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded disjoint ``(train, val)`` index sets over ``range(n)``; ``val_size`` is a count or a fraction."""
    if isinstance(val_size, bool) or val_size < 0:
        raise UserError(f"val_size must be a count >= 0 or a fraction in [0, 1), got {val_size!r}")
    if isinstance(val_size, float):
        if val_size >= 1:
            raise UserError(f"val_size {val_size} as a fraction must be < 1: pass a count or a fraction in [0, 1)")
        val_size = int(val_size * n)
    if val_size >= n:
        raise UserError(
            f"val_size {val_size} is not smaller than the {n} training images: lower --data.val_size"
            " (a count or a fraction), or use more training data"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


class InMemoryDataModule(LightningDataModule):
    """Base for datasets held in memory as uint8 tensors; subclasses implement :meth:`_load`.

    The arguments below are shared by every DataModule here and documented only here. A subclass
    takes its own arguments and passes these on with ``**kwargs``; its ``arg_defaults`` give them
    the dataset's defaults, which ``--data.help`` and ``--print_config`` show (see
    :mod:`project.data.signature`). It also defines ``num_classes``, ``in_channels`` and
    ``image_size`` (class attributes or properties, known before ``setup``; the CLI links them
    into the model), ``in_channels`` already when it calls ``super().__init__``.

    Args:
        batch_size: Training batch size (per process under DDP).
        val_size: Training images held out for validation: a count, or a fraction in [0, 1);
            0 disables validation. The split is drawn with ``seed`` and never changes.
        seed: Seed of the validation split, of any subset the dataset draws before it, and of
            the shuffle (the epoch is added to it).
        eval_batch_size: Batch size for validation, test and predict; defaults to ``batch_size``.
        drop_last: Drop the incomplete last training batch.
        crop_padding: Random-crop augmentation: zero-pad by this many pixels, crop back at a
            random offset (0 = off).
        horizontal_flip: Mirror training images left-right with probability 0.5.
        rotate_degrees: Random rotation in [-rotate_degrees, rotate_degrees] (0 = off).
        translate: Random shift of up to this fraction of the image size (0 = off).
        scale: Random zoom factor range ``[low, high]`` (None = off).
        mean: Per-channel mean of the pixels in [0, 1], subtracted after augmentation;
            None = 0.5 for every channel.
        std: Per-channel standard deviation of the pixels in [0, 1]; None = 0.5 for every channel.
    """

    #: New defaults of the arguments above, per dataset (see :mod:`project.data.signature`).
    arg_defaults: ClassVar[dict[str, Any]] = {}
    #: Inherited arguments a subclass pins and hides from its signature.
    fixed_args: ClassVar[dict[str, Any]] = {}
    num_classes: int
    in_channels: int
    image_size: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        complete_init(cls)

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int | float = 5000,
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
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise UserError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        if crop_padding < 0 or rotate_degrees < 0 or not 0 <= translate <= 1:
            raise UserError(
                f"augmentation needs crop_padding >= 0, rotate_degrees >= 0, translate in [0, 1];"
                f" got {crop_padding}, {rotate_degrees}, {translate}"
            )
        if scale is not None and not 0 < scale[0] <= scale[1]:
            raise UserError(f"scale must be [low, high] with 0 < low <= high, got {list(scale)}")
        mean = (0.5,) * self.in_channels if mean is None else mean
        std = (0.5,) * self.in_channels if std is None else std
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise UserError(f"mean {list(mean)} and std {list(std)} need one value per channel, std > 0")
        if len(mean) != self.in_channels:
            raise UserError(
                f"mean/std have {len(mean)} values but the images have {self.in_channels} channels:"
                " give one value per channel"
            )
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed
        self.eval_batch_size = eval_batch_size or batch_size
        self.drop_last = drop_last
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self.rotate_degrees = rotate_degrees
        self.translate = translate
        self.scale = tuple(scale) if scale is not None else None
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._train: Split | None = None
        self._val: Split | None = None
        self._test: Split | None = None
        self._device_splits: dict[str, Split] = {}

    # --- loading ---

    def _load(self, train: bool) -> Split:
        """The official train (``train=True``) or test split as ``(uint8 [N, C, H, W], int64 [N])``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs, once; the validation split is the same on every call and process."""
        if stage in (None, "fit", "validate") and self._train is None:
            images, labels = self._load(train=True)
            train_idx, val_idx = split_indices(len(labels), self.val_size, self.seed)
            self._train = (images[train_idx], labels[train_idx])
            self._val = (images[val_idx], labels[val_idx])
        if stage in (None, "test", "predict") and self._test is None:
            self._test = self._load(train=False)

    def _split(self, name: str) -> Split:
        split = getattr(self, f"_{name}")
        if split is None:
            raise RuntimeError(f"call setup() before asking for the {name} dataloader")
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else None
        if device is None or device.type != "cuda":
            return split
        # GPU-resident data: move each split once; batches are then sliced on the GPU.
        if name not in self._device_splits:
            self._device_splits[name] = (split[0].to(device), split[1].to(device))
        return self._device_splits[name]

    def _loader(self, name: str, train: bool) -> InMemoryLoader | list:
        images, labels = self._split(name)
        if name == "val" and len(labels) == 0:
            return []  # val_size 0: no validation
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        loader = InMemoryLoader(
            images,
            labels,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=self.drop_last and train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            even_batches=train,
        )
        if train and len(loader) == 0:
            raise UserError(
                f"{len(labels)} training images give no full batch of {self.batch_size} per process"
                f" over {world} process(es) with drop_last: lower --data.batch_size or set drop_last false"
            )
        return loader

    # Every loader goes through _loader, the one place a subclass with other loaders hooks in.

    def train_dataloader(self) -> Iterable:
        return self._loader("train", train=True)

    def val_dataloader(self) -> Iterable:
        return self._loader("val", train=False)

    def test_dataloader(self) -> Iterable:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> Iterable:
        return self._loader("test", train=False)

    # --- on the device: augment (training only) and normalise ---

    @property
    def augments(self) -> bool:
        """Whether any augmentation is switched on."""
        return bool(self.crop_padding or self.horizontal_flip or self.rotate_degrees or self.translate or self.scale)

    def augment(self, images: Tensor) -> Tensor:
        """Apply the configured augmentations to a float batch with pixels in 0..255."""
        if self.rotate_degrees or self.translate or self.scale:
            images = aug.random_affine(images, self.rotate_degrees, self.translate, self.scale)
        images = aug.random_crop(images, self.crop_padding)
        if self.horizontal_flip:
            images = aug.random_hflip(images)
        return images

    def transform(self, images: Tensor, train: bool) -> Tensor:
        """uint8 batch to the float, normalised batch the model sees; augmented when ``train``."""
        x = images.float()
        if train and self.augments:
            x = self.augment(x)
        return aug.normalize(x, self.mean, self.std)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, Tensor):  # the model's example input (model summary), already a float batch
            return batch
        images, labels = batch[0], batch[1]
        training = self.trainer is not None and self.trainer.training
        return (self.transform(images, train=training), labels, *batch[2:])
