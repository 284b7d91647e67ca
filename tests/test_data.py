"""The data package: splits, loaders, DDP sharding, augmentation, file readers and their errors."""

import gzip
import inspect
import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch import nn

import project.data
from project.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ImageFolderDataModule,
    InMemoryLoader,
    MNISTDataModule,
    MNISTSampleDataModule,
)
from project.cli import main as cli_main
from project.data import augment as aug
from project.data.base import InMemoryDataModule, split_indices
from project.data.idx import read_idx, write_idx
from project.errors import UserError
from tests import fakes
from tests.conftest import REPO

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
LENET = str(REPO / "configs" / "mnist_lenet.yaml")


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


# ---------------------------------------------------------------- augmentation


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


# ---------------------------------------------------------------- splits and loaders


def test_mnist_sizes_shapes_and_dtypes(mnist_dir: Path) -> None:
    dm = mnist(mnist_dir, batch_size=32)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    assert len(dm._train[1]) == 250 and len(dm._val[1]) == 50 and len(dm._test[1]) == 70
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert len(dm.train_dataloader()) == 8 and len(dm.val_dataloader()) == 2 and len(dm.test_dataloader()) == 3
    assert sum(len(b[1]) for b in dm.predict_dataloader()) == 70


def test_split_is_disjoint_seeded_and_stable(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = split_indices(100, 0.2, seed=3)
    assert len(val) == 20 and not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))

    dm = mnist(mnist_dir, seed=7)
    first_val = dm._val[0].clone()
    assert not image_keys(dm._train[0]) & image_keys(dm._val[0])
    calls = []
    monkeypatch.setattr(dm, "_load", lambda train: calls.append(train))
    dm.setup("fit")
    dm.setup("test")
    assert calls == [] and torch.equal(dm._val[0], first_val)  # cached, same split
    monkeypatch.undo()
    assert torch.equal(mnist(mnist_dir, seed=7)._val[0], first_val)  # another instance, same seed
    assert not torch.equal(mnist(mnist_dir, seed=8)._val[0], first_val)


@pytest.mark.parametrize("val_size", [300, 1000, 1.0])
def test_val_size_too_large_is_a_user_error(mnist_dir: Path, val_size) -> None:
    with pytest.raises(UserError, match="300|1.0"):
        mnist(mnist_dir, val_size=val_size)
    with pytest.raises(UserError, match=r"val_size 300 .* 300 training images"):
        mnist(mnist_dir, val_size=300)


def test_val_size_zero_means_no_validation(mnist_dir: Path) -> None:
    dm = mnist(mnist_dir, val_size=0)
    assert dm.val_dataloader() == [] and len(dm._train[1]) == 300


def test_eval_batches_are_the_normalised_images_and_train_batches_are_augmented(mnist_dir: Path) -> None:
    dm = mnist(mnist_dir, batch_size=64, crop_padding=4, rotate_degrees=15)
    stored, labels = next(iter(dm.val_dataloader()))
    dm.trainer = SimpleNamespace(training=False)
    out, out_labels = dm.on_after_batch_transfer((stored, labels), 0)
    assert out.dtype == torch.float32 and out_labels is labels
    torch.testing.assert_close(out, aug.normalize(stored, (0.1307,), (0.3081,)))
    dm.trainer = SimpleNamespace(training=True)
    augmented, _ = dm.on_after_batch_transfer((stored, labels), 0)
    assert augmented.shape == out.shape and (augmented - out).abs().amax(dim=(1, 2, 3)).gt(0.1).float().mean() > 0.9
    dm.trainer = None
    torch.testing.assert_close(dm.on_after_batch_transfer((stored, labels), 0)[0], out)  # no trainer: not training


def shards(n: int, world: int, batch: int, **kwargs) -> list[list[torch.Tensor]]:
    """The label batches each rank sees; labels are the sample indices."""
    images, labels = torch.arange(n).view(n, 1), torch.arange(n)
    return [
        [b[1] for b in InMemoryLoader(images, labels, batch, rank=r, world_size=world, **kwargs)] for r in range(world)
    ]


@pytest.mark.parametrize(("n", "world", "batch"), [(20, 2, 4), (21, 2, 4), (9, 2, 4), (23, 3, 5), (7, 2, 3), (5, 4, 2)])
def test_ddp_training_shards_are_disjoint_complete_and_equally_long(n: int, world: int, batch: int) -> None:
    per_rank = shards(n, world, batch, shuffle=True, seed=1)
    seen = torch.cat([torch.cat(r) for r in per_rank]).tolist()
    assert sorted(seen) == list(range(n))  # nothing duplicated, nothing dropped
    assert len({len(r) for r in per_rank}) == 1  # equal batch counts: no rank waits in an all-reduce
    assert all(0 < len(b) <= batch for r in per_rank for b in r)


def test_ddp_short_rank_splits_its_last_batch_instead_of_an_empty_one() -> None:
    rank0, rank1 = shards(9, 2, 4)  # shards of 5 and 4: [4, 1] and [2, 2]
    assert [len(b) for b in rank0] == [4, 1] and [len(b) for b in rank1] == [2, 2]
    with pytest.raises(UserError, match="batch_size 1"):
        shards(3, 2, 1)


def test_ddp_drop_last_gives_full_equal_batches() -> None:
    per_rank = shards(23, 3, 3, shuffle=True, drop_last=True)
    assert [len(r) for r in per_rank] == [2, 2, 2] and all(len(b) == 3 for r in per_rank for b in r)
    seen = torch.cat([torch.cat(r) for r in per_rank]).tolist()
    assert len(set(seen)) == 18


def test_ddp_eval_shards_are_interleaved_without_padding() -> None:
    per_rank = shards(11, 2, 4, even_batches=False)
    assert torch.cat(per_rank[0]).tolist() == [0, 2, 4, 6, 8, 10]
    assert torch.cat(per_rank[1]).tolist() == [1, 3, 5, 7, 9]


def test_set_epoch_reshuffles_deterministically() -> None:
    def order(epoch: int, seed: int = 0) -> list[int]:
        loader = InMemoryLoader(torch.zeros(50, 1), torch.arange(50), 8, shuffle=True, seed=seed)
        it = iter(loader)  # Lightning calls iter() before set_epoch(): the order must follow set_epoch
        loader.sampler.set_epoch(epoch)
        return torch.cat([b[1] for b in it]).tolist()

    assert order(3) == order(3) and sorted(order(3)) == list(range(50))
    assert order(3) != order(4) and order(3) != order(3, seed=1)


def test_loader_state_dict_resumes_mid_epoch() -> None:
    def loader() -> InMemoryLoader:
        return InMemoryLoader(torch.zeros(40, 1), torch.arange(40), 6, shuffle=True, seed=5)

    first = loader()
    first.sampler.set_epoch(2)
    it = iter(first)
    seen = [next(it)[1] for _ in range(3)]
    state = first.state_dict()
    rest = [b[1] for b in it]
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert [b[1].tolist() for b in resumed] == [b.tolist() for b in rest]
    assert len(seen) + len(rest) == len(first) == 7
    assert len(list(resumed)) == 7  # the skip applies to one epoch only


class _Recorder(L.LightningModule):
    """Tiny model that remembers what reached its steps."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(784, 10)
        self.train_batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.val_batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.train_batches.append((self.current_epoch, batch[0].clone(), batch[1].clone()))
        return nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch[0].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_sets_epochs_and_augments_only_in_training(mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=50, batch_size=25, crop_padding=3)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    epochs = [e for e, _, _ in model.train_batches]
    assert epochs == [0, 0, 1, 1]
    labels = [b[2] for b in model.train_batches]
    assert not torch.equal(labels[0], labels[2])  # epoch 1 reshuffled via sampler.set_epoch
    loader = InMemoryLoader(dm._train[0], dm._train[1], 25, shuffle=True, seed=0)
    loader.sampler.set_epoch(1)
    expected_images, expected_labels = next(iter(loader))
    assert torch.equal(labels[2], expected_labels)
    stored_val = aug.normalize(dm._val[0], dm.mean, dm.std)
    torch.testing.assert_close(torch.cat(model.val_batches[:2]), stored_val)  # validation untouched
    train_plain = aug.normalize(expected_images, dm.mean, dm.std)
    assert not torch.allclose(model.train_batches[2][1], train_plain)  # training augmented


def test_trainer_runs_without_validation(mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=0, batch_size=100)
    model = _Recorder()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert len(model.train_batches) == 3 and model.val_batches == []


# ---------------------------------------------------------------- MNIST specifics


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


# ---------------------------------------------------------------- CIFAR


def test_fake_cifar10_and_cifar100_load(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(fakes.write_fake_cifar10(tmp_path / "c10", 100, 20)), val_size=10)
    dm.prepare_data()
    dm.setup()
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    assert dm._train[0].shape == (90, 3, 32, 32) and dm._train[0].dtype == torch.uint8 and len(dm._test[1]) == 20
    assert dm.crop_padding == 4 and dm.horizontal_flip
    dm100 = CIFAR100DataModule(data_dir=str(fakes.write_fake_cifar100(tmp_path / "c100", 200, 20)), val_size=0)
    dm100.setup()
    assert dm100.num_classes == 100 and int(dm100._train[1].max()) == 99 and len(dm100._train[1]) == 200


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    root = fakes.write_fake_cifar10(tmp_path, 50, 10)
    marker = tmp_path / "pwned"
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": []}, protocol=2))
    dm = CIFAR10DataModule(data_dir=str(root), download=False, val_size=0)
    with pytest.raises(UserError, match=r"data_batch_3 asks to load (posix|nt|os)\.system .*refused"):
        dm.setup("fit")
    assert not marker.exists()
    pickle.loads(batch.read_bytes())  # the payload is real: a plain unpickler runs it (a harmless touch)
    assert marker.exists()


def test_truncated_cifar_batch_is_a_user_error(tmp_path: Path) -> None:
    root = fakes.write_fake_cifar10(tmp_path, 50, 10)
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(UserError, match="test_batch is not a readable CIFAR batch"):
        CIFAR10DataModule(data_dir=str(root), download=False).setup("test")
    with pytest.raises(UserError, match="cifar-10-batches-py.*download=False"):
        CIFAR10DataModule(data_dir=str(tmp_path / "none"), download=False).prepare_data()


# ---------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    return fakes.write_fake_image_folder(root, classes=("cat", "dog", "fox"), n_per_class=10, size=20)


def test_image_folder_in_memory_and_streaming_agree(folder_dir: Path) -> None:
    kwargs = dict(data_dir=str(folder_dir), image_size=16, val_size=6, batch_size=8, num_workers=0)
    fast = ImageFolderDataModule(in_memory=True, **kwargs)
    slow = ImageFolderDataModule(in_memory=False, **kwargs)
    assert fast.class_names == ["cat", "dog", "fox"] and (fast.num_classes, fast.in_channels) == (3, 3)
    for dm in (fast, slow):
        dm.setup()
    assert len(fast.train_dataloader()) == len(slow.train_dataloader()) == 3
    for name in ("val_dataloader", "test_dataloader"):
        a = [torch.cat(t) for t in zip(*getattr(fast, name)())]
        b = [torch.cat(t) for t in zip(*getattr(slow, name)())]
        assert a[0].shape[1:] == (3, 16, 16) and a[0].dtype == b[0].dtype == torch.uint8
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1].long())
    gray = ImageFolderDataModule(data_dir=str(folder_dir), image_size=20, channels=1, in_memory=True, val_size=0)
    gray.setup("fit")
    assert gray._train[0].shape == (30, 1, 20, 20) and gray.mean == (0.5,)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train.* not found"):
        ImageFolderDataModule(data_dir=str(tmp_path / "nowhere"))
    root = fakes.write_fake_image_folder(tmp_path / "a", classes=("a", "b"), n_per_class=2, size=8, fmt="jpg")
    (root / "train" / "c").mkdir()
    with pytest.raises(UserError, match=r"class folder .*train/c has no images"):
        ImageFolderDataModule(data_dir=str(root))
    (root / "train" / "c" / "0.png").write_bytes((root / "train" / "a" / "0000.jpg").read_bytes())
    with pytest.raises(UserError, match=r"test/ classes \['a', 'b'\] differ from train/ classes \['a', 'b', 'c'\]"):
        ImageFolderDataModule(data_dir=str(root))
    (root / "test" / "c").mkdir()
    (root / "test" / "c" / "bad.png").write_bytes(b"not an image at all")
    dm = ImageFolderDataModule(data_dir=str(root), in_memory=True, val_size=0, num_workers=0)
    dm.setup("fit")
    with pytest.raises(UserError, match=r"bad.png could not be decoded as an image") as info:
        dm.setup("test")
    assert "\n" not in str(info.value)


def _quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**defaults, **kwargs})


class _SaveAtStep(L.Callback):
    """Saves a checkpoint right after optimizer step ``step``, as ModelCheckpoint(every_n_train_steps) would."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_resume_mid_epoch_sees_the_same_batches_as_an_uninterrupted_run(mnist_dir: Path, tmp_path: Path) -> None:
    def datamodule() -> MNISTDataModule:
        return MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=50, batch_size=50)

    whole = _Recorder()
    _quiet_trainer(max_epochs=2).fit(whole, datamodule=datamodule())
    first = _Recorder()
    save = _SaveAtStep(7, tmp_path / "mid.ckpt")  # 5 batches per epoch: inside epoch 1
    _quiet_trainer(max_epochs=2, max_steps=7, callbacks=[save]).fit(first, datamodule=datamodule())
    rest = _Recorder()
    _quiet_trainer(max_epochs=2).fit(rest, datamodule=datamodule(), ckpt_path=tmp_path / "mid.ckpt", weights_only=True)
    labels = [b[2].tolist() for b in whole.train_batches]
    assert len(labels) == 10 and len(first.train_batches) == 7 and len(rest.train_batches) == 3
    assert [b[2].tolist() for b in first.train_batches + rest.train_batches] == labels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_splits_live_on_the_gpu_when_training_there(mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=50, batch_size=25, crop_padding=2)
    model = _Recorder()
    _quiet_trainer(accelerator="gpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1.0).fit(
        model, datamodule=dm
    )
    assert dm._device_splits["train"][0].device.type == "cuda" and dm._train[0].device.type == "cpu"
    assert model.train_batches[0][1].device.type == "cuda" and model.train_batches[0][1].dtype == torch.float32
    stored_val = aug.normalize(dm._val[0], dm.mean, dm.std)
    torch.testing.assert_close(torch.cat(model.val_batches).cpu(), stored_val)


def test_cifar_download_failure_is_a_one_line_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    calls = []

    def offline(url, root, filename=None, md5=None):
        calls.append((url, filename, md5))
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match=r"CIFAR-100 not found .*could not be downloaded \(OSError: \[Errno -3\]"):
        CIFAR100DataModule(data_dir=str(tmp_path)).prepare_data()
    assert calls and calls[0][0].endswith("cifar-100-python.tar.gz") and calls[0][2]  # torchvision's URL and md5


# ---------------------------------------------------------------- arguments: declared once, each dataset's defaults

_SHARED_DEFAULTS = dict(batch_size=128, val_size=5000, seed=0, eval_batch_size=None, drop_last=False, crop_padding=0,
                        horizontal_flip=False, rotate_degrees=0.0, translate=0.0, scale=None, mean=None, std=None)
_REQUIRED = object()
# Every argument of every DataModule with its default, in --help order: the dataset's own arguments first.
DEFAULTS = {
    "MNISTDataModule": dict(data_dir="data", download=True, classes=None, samples_per_class=None,
                            **{**_SHARED_DEFAULTS, "mean": [0.1307], "std": [0.3081]}),
    "MNISTSampleDataModule": dict(classes=None, samples_per_class=None,
                                  **{**_SHARED_DEFAULTS, "val_size": 500, "mean": [0.1307], "std": [0.3081]}),
    "CIFAR10DataModule": dict(data_dir="data", download=True,
                              **{**_SHARED_DEFAULTS, "batch_size": 256, "crop_padding": 4, "horizontal_flip": True,
                                 "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}),
    "CIFAR100DataModule": dict(data_dir="data", download=True,
                               **{**_SHARED_DEFAULTS, "batch_size": 256, "crop_padding": 4, "horizontal_flip": True,
                                  "mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}),
    "ImageFolderDataModule": dict(data_dir=_REQUIRED, image_size=32, channels=3, in_memory=False, num_workers=2,
                                  **{**_SHARED_DEFAULTS, "val_size": 0.1}),
}


def _as_help_shows(value) -> str:
    if value is _REQUIRED:
        return "required"
    if value is None:
        return "null"
    return str(tuple(value)) if isinstance(value, list) else str(value)


def help_options(text: str) -> dict[str, tuple[str, str]]:
    """The ``--data.X`` options of a ``--data.help`` page, in order: name -> (description, default as shown)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("  --data.")]
    options = {}
    for start, end in zip(starts, [*starts[1:], len(lines)]):
        spec, _, first = lines[start].strip().partition("  ")  # the description may start on the option's line
        block = " ".join([first, *(line.strip() for line in lines[start + 1 : end])]).strip()
        match = re.fullmatch(r"(.*?)\s*\((required, )?type: (.*?)(?:, default: (.*))?\)", block)
        assert match, f"unexpected help entry: {lines[start:end]}"
        name = re.match(r"--data\.(\w+)", spec).group(1)
        options[name] = (match.group(1), "required" if match.group(2) else match.group(4))
    return options


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_cli_help_lists_every_option_documented_with_the_datasets_default(name, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={LENET}", "--data.help", f"project.data.{name}"])
    assert exit_info.value.code == 0
    options = help_options(capsys.readouterr().out)
    assert list(options) == list(DEFAULTS[name])  # every option, no other, the dataset's own first
    for option, (description, shown) in options.items():
        assert len(description.split()) >= 3, f"--data.{option} is not documented"
        assert shown == _as_help_shows(DEFAULTS[name][option]), f"--data.{option}"


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_print_config_shows_the_datasets_defaults_and_round_trips(
    name, folder_dir, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    required = [f"--data.data_dir={folder_dir}"] if name == "ImageFolderDataModule" else []
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--data=project.data.{name}", *required, "--print_config"])
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)["data"]
    expected = {k: str(folder_dir) if v is _REQUIRED else v for k, v in DEFAULTS[name].items()}
    assert data == {"class_path": f"project.data.{name}", "init_args": expected}
    assert list(data["init_args"]) == list(expected)
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config=printed.yaml", "--print_config"])
    assert capsys.readouterr().out == printed
    # The printed arguments build the DataModule, whose hparams are those arguments again.
    dm = getattr(project.data, name)(**data["init_args"])
    assert dict(dm.hparams) == expected
    assert dict(type(dm)(**dm.hparams).hparams) == expected


def test_subclasses_say_only_what_differs() -> None:
    for path in {inspect.getsourcefile(getattr(project.data, name)) for name in DEFAULTS}:  # base.py declares them
        declared = [arg for arg in _SHARED_DEFAULTS if re.search(rf"\b{arg}: ", Path(path).read_text())]
        assert declared == [], f"{path} declares {declared} again"
    assert list(inspect.signature(MNISTSampleDataModule).parameters)[:2] == ["classes", "samples_per_class"]
    with pytest.raises(TypeError, match=r"name no inherited argument: \['val_sise'\]"):
        type("Typo", (MNISTDataModule,), {"arg_defaults": {"val_sise": 10}})
    with pytest.raises(TypeError, match="pass the shared arguments on with \\*\\*kwargs"):
        type("NoKwargs", (InMemoryDataModule,), {"__init__": lambda self, data_dir="x": None})


def test_own_arguments_stay_positional_and_mean_std_follow_the_channels(mnist_dir: Path, folder_dir: Path) -> None:
    dm = MNISTDataModule(str(mnist_dir), False, val_size=10, mean=None, std=None)
    assert (dm.data_dir, dm.download, dm.mean, dm.std) == (mnist_dir, False, (0.5,), (0.5,))
    assert ImageFolderDataModule(str(folder_dir), 16, 1).mean == (0.5,)
    with pytest.raises(UserError, match="mean/std have 3 values but the images have 1 channels"):
        MNISTDataModule(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    with pytest.raises(UserError, match=r"mean \[0.1\] and std \[1.0, 1.0\] need one value per channel"):
        CIFAR10DataModule(mean=(0.1,), std=(1.0, 1.0))


@pytest.mark.parametrize("in_memory", [True, False])
def test_image_folder_paths_share_the_loader_contract(folder_dir: Path, in_memory: bool) -> None:
    dm = ImageFolderDataModule(data_dir=str(folder_dir), image_size=8, val_size=0, batch_size=4, num_workers=0,
                               in_memory=in_memory)
    with pytest.raises(RuntimeError, match="call setup"):
        dm.train_dataloader()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, InMemoryLoader if in_memory else torch.utils.data.DataLoader)
    assert dm.val_dataloader() == []  # val_size 0: no validation on either path
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8
    assert (dm._train is not None) == in_memory  # only the in-memory path holds the decoded split
