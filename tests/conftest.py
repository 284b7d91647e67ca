"""Shared fixtures: fake datasets in the real on-disk formats, the real data when present, one torch thread;
runners of the CLI and of code in a fresh interpreter."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests import fakes

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROJECT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def fake_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake_mnist")
    fakes.write_fake_mnist(root, n_train=512, n_test=128)
    return root


@pytest.fixture(scope="session")
def fake_cifar10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake_cifar10")
    fakes.write_fake_cifar10(root, n_train=320, n_test=64)
    return root


@pytest.fixture(scope="session")
def fake_cifar100_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake_cifar100")
    fakes.write_fake_cifar100(root, n_train=320, n_test=64)
    return root


@pytest.fixture(scope="session")
def fake_folder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake_folder")
    fakes.write_fake_image_folder(root, classes=("cat", "dog", "fox"), n_per_class=12, size=32)
    return root


@pytest.fixture(scope="session")
def fake_data_dirs(fake_mnist_dir, fake_cifar10_dir, fake_cifar100_dir, fake_folder_dir) -> dict[str, Path]:
    """Fake data folder for each DataModule class name that reads one."""
    return {
        "MNISTDataModule": fake_mnist_dir,
        "CIFAR10DataModule": fake_cifar10_dir,
        "CIFAR100DataModule": fake_cifar100_dir,
        "ImageFolderDataModule": fake_folder_dir,
    }


@pytest.fixture(scope="session")
def real_mnist_dir() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead, and far more on a busy machine
    yield
    torch.set_num_threads(threads)


def run_project(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m project ARGS`` in a fresh process, run in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "project", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_python(code: str, cwd: Path, project_on_path: bool = True, env: dict[str, str] | None = None,
               timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter (with ``env`` added to the environment) and return the JSON object
    it prints last."""
    extra = {"PYTHONPATH": str(REPO)} if project_on_path else {}
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **extra, "PYTHONWARNINGS": "ignore", **(env or {})}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
