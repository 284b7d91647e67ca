"""A trained fp32 checkpoint for the commands that start from one (compress, export)."""

from pathlib import Path

import pytest

from project.cli import main as cli_main
from tests.conftest import REPO

FAST = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--data.val_size=64", "--data.batch_size=32"]


def _train(data_dir: Path, root: Path) -> Path:
    """The fp32 checkpoint: LeNet-5, 3 epochs on the fake MNIST."""
    cli_main(["fit", f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--data.data_dir={data_dir}", "--trainer.max_epochs=3",
              f"--trainer.logger.init_args.save_dir={root}", "--test_after_fit=false", *FAST,
              "--trainer.limit_train_batches=1.0"])
    ckpts = sorted(root.glob("*/version_*/checkpoints/last.ckpt"))
    assert ckpts, "the fp32 training run wrote no checkpoint"
    return ckpts[-1]


@pytest.fixture(scope="session")
def lenet_ckpt(fake_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(fake_mnist_dir, tmp_path_factory.mktemp("fp32"))
