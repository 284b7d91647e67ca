"""ImageFolderDataModule: the in-memory and streaming paths agree and share the loader contract; bad folders."""

from pathlib import Path

import pytest
import torch

from project.data import (
    ImageFolderDataModule,
    InMemoryLoader,
)
from project.errors import UserError
from tests import fakes


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
