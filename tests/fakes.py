"""Small fake datasets written in the real on-disk formats (IDX, CIFAR pickle batches, image folders).

Pixels are a fixed random template per class plus noise, so a small model learns them in a few
steps while the images still vary. Everything is seeded: the same call writes the same bytes.
"""

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg, encode_png

from project.data.idx import write_idx


def patterned_images(
    n: int, num_classes: int, shape: tuple[int, ...], seed: int = 0, noise: float = 40.0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images of ``shape`` and their labels (balanced, shuffled): class template + noise."""
    templates = np.random.default_rng(1234).random((num_classes, *shape)) > 0.5  # the same for every split
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes)
    pixels = templates[labels] * 150.0 + 50.0 + rng.normal(0.0, noise, (n, *shape))
    return np.clip(pixels, 0, 255).round().astype(np.uint8), labels.astype(np.int64)


def write_fake_mnist(root: str | Path, n_train: int = 256, n_test: int = 64, gz: bool = False) -> Path:
    """The four MNIST IDX files (28x28, 10 classes) in ``root/MNIST/raw/``; returns ``root`` (the data_dir)."""
    root = Path(root)
    raw = root / "MNIST" / "raw"
    suffix = ".gz" if gz else ""
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = patterned_images(n, 10, (28, 28), seed=seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))
    return root


def _cifar_batch(images: np.ndarray, labels: np.ndarray, label_key: bytes, name: str) -> dict:
    extra = {b"coarse_labels": (labels // 5).tolist()} if label_key == b"fine_labels" else {}
    return {
        b"batch_label": name.encode(),
        label_key: labels.tolist(),
        **extra,
        b"data": images.reshape(len(images), 3072),
        b"filenames": [f"fake_{i:05d}.png".encode() for i in range(len(images))],
    }


def _write_pickle(path: Path, obj: object) -> None:
    # Protocol 2, like the original (Python 2) batches.
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_fake_cifar10(root: str | Path, n_train: int = 500, n_test: int = 100) -> Path:
    """``root/cifar-10-batches-py/`` with data_batch_1..5 and test_batch; returns ``root`` (the data_dir)."""
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = patterned_images(n_train, 10, (3, 32, 32), seed=1)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        batch = _cifar_batch(images[part], labels[part], b"labels", f"training batch {i} of 5")
        _write_pickle(folder / f"data_batch_{i}", batch)
    images, labels = patterned_images(n_test, 10, (3, 32, 32), seed=2)
    _write_pickle(folder / "test_batch", _cifar_batch(images, labels, b"labels", "testing batch 1 of 1"))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _write_pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": n_train // 5})
    return root


def write_fake_cifar100(root: str | Path, n_train: int = 500, n_test: int = 100) -> Path:
    """``root/cifar-100-python/`` with train, test (b"fine_labels") and meta; returns ``root``."""
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = patterned_images(n, 100, (3, 32, 32), seed=seed)
        _write_pickle(folder / name, _cifar_batch(images, labels, b"fine_labels", name))
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)]}
    _write_pickle(folder / "meta", meta)
    return root


def write_fake_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("cat", "dog"),
    n_per_class: int = 8,
    size: int = 32,
    fmt: str = "png",
    splits: Sequence[str] = ("train", "test"),
) -> Path:
    """``root/<split>/<class>/NNNN.<fmt>`` RGB images (``fmt`` png or jpg); returns ``root`` (the data_dir)."""
    if fmt not in ("png", "jpg"):
        raise ValueError(f"fmt must be png or jpg, got {fmt}")
    root = Path(root)
    for seed, split in enumerate(splits):
        images, labels = patterned_images(n_per_class * len(classes), len(classes), (3, size, size), seed=seed)
        counts = dict.fromkeys(range(len(classes)), 0)
        for image, label in zip(images, labels):
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            tensor = torch.from_numpy(image)
            data = encode_png(tensor) if fmt == "png" else encode_jpeg(tensor, quality=95)
            (folder / f"{counts[label]:04d}.{fmt}").write_bytes(data.numpy().tobytes())
            counts[label] += 1
    return root
