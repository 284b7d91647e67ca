"""Batch augmentation on the training device: per-sample crops, flips, affine; normalisation."""


import torch

from project.data import augment as aug
from tests.data.conftest import image_keys


def test_random_crop_shifts_each_sample_by_its_own_offset() -> None:
    base = torch.arange(1, 65, dtype=torch.uint8).view(1, 1, 8, 8)
    x = base.repeat(32, 3, 1, 1)
    out = aug.random_crop(x, 2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(base, (2, 2, 2, 2))[0, 0]
    offsets = []
    for sample in out:
        assert torch.equal(sample[0], sample[1]) and torch.equal(sample[0], sample[2])  # channels move together
        found = [(i, j) for i in range(5) for j in range(5) if torch.equal(padded[i : i + 8, j : j + 8], sample[0])]
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 5  # per-sample offsets, not one for the batch
    assert aug.random_crop(x, 0) is x


def test_random_hflip_per_sample_and_identity() -> None:
    x = torch.rand(64, 3, 5, 7)
    assert torch.equal(aug.random_hflip(x, p=0.0), x)
    assert torch.equal(aug.random_hflip(x, p=1.0), x.flip(-1))
    out = aug.random_hflip(x, p=0.5, generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, s.flip(-1)) for o, s in zip(out, x)])
    kept = torch.tensor([torch.equal(o, s) for o, s in zip(out, x)])
    assert bool((flipped ^ kept).all()) and 10 < int(flipped.sum()) < 54


def test_random_affine_varies_per_sample_and_keeps_dtype() -> None:
    x = torch.zeros(16, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 10:18, 6:22] = 255
    assert aug.random_affine(x) is x
    out = aug.random_affine(x, degrees=30, translate=0.1, scale=(0.8, 1.2), generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert len(image_keys(out)) == 16  # every sample got its own transform
    assert not torch.equal(out, x)
    f = aug.random_affine(x.float(), degrees=10, generator=torch.Generator().manual_seed(1))
    assert f.dtype == torch.float32


def test_normalize_matches_formula() -> None:
    x = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = aug.normalize(x, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
