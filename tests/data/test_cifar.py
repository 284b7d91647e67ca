"""CIFAR-10/100: the pickle batches (refused when they would run code), truncation, download failure."""

import os
import pickle
from pathlib import Path

import pytest
import torch

from project.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
)
from project.errors import UserError
from tests import fakes


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
