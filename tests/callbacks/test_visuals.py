"""TensorBoard views: weight histograms, per-layer sparsity, misclassified test images."""

from functools import partial
from pathlib import Path

import pytest
import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from project.callbacks.visuals import TensorBoardViews, layer_weights, misclassified_figure
from project.compression.sparsity import sparsity_of
from project.data import MNISTDataModule
from project.tasks.classifier import ImageClassifier
from tests.tb import read_run, scalars


def test_layer_weights_are_conv_and_linear_weights_and_sparsity_counts_zeros() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        net[3].weight[0] = 0.0  # half of the linear weights
        net[0].weight.view(-1)[:9] = 0.0  # a quarter of the conv weights
    weights = layer_weights(net)
    assert list(weights) == ["0.weight", "3.weight"]  # no biases, no BatchNorm vectors
    overall, per_layer = sparsity_of(weights.items())
    assert per_layer == {"0.weight": 0.25, "3.weight": 0.5}
    assert overall == pytest.approx((9 + 8) / (36 + 16))


def test_misclassified_figure_undoes_the_normalisation_and_titles_pred_over_true() -> None:
    pixels = torch.rand(3, 1, 8, 8)
    mean, std = (0.1307,), (0.3081,)
    fig = misclassified_figure((pixels - mean[0]) / std[0], torch.tensor([1, 2, 0]), torch.tensor([0, 1, 2]),
                               class_names=["cat", "dog", "fox"], mean=mean, std=std, columns=2)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 3
    assert [ax.get_title() for ax in shown] == ["dog / cat", "fox / dog", "cat / fox"]
    for ax, original in zip(shown, pixels):
        assert torch.allclose(torch.as_tensor(ax.images[0].get_array().data).float(), original[0], atol=1e-5)


def test_fit_and_test_write_histograms_sparsity_and_misclassified_grid(fake_mnist_dir: Path, tmp_path: Path) -> None:
    seed_everything(0)
    # lr 0: the weights (with their zeros) stay as set, so the logged sparsity is known exactly,
    # and the untrained model misclassifies plenty of test images
    model = ImageClassifier(10, arch="mlp", arch_kwargs={"hidden": [16]}, optimizer=partial(torch.optim.SGD, lr=0.0))
    with torch.no_grad():
        model.net.head.weight[:5] = 0.0
    data = MNISTDataModule(data_dir=str(fake_mnist_dir), download=False, val_size=64, batch_size=64)
    logger = TensorBoardLogger(tmp_path, name="views", default_hp_metric=False)
    trainer = Trainer(max_epochs=2, limit_train_batches=2, accelerator="cpu", logger=logger, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[TensorBoardViews(max_misclassified=12)])
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)

    run = read_run(Path(logger.log_dir))
    tags = run.Tags()
    assert {"weights/backbone.1.weight", "weights/head.weight"} <= set(tags["histograms"])
    assert {"sparsity/per_layer", "test/misclassified", "test/confusion_matrix"} <= set(tags["images"])
    logged = scalars(Path(logger.log_dir))
    assert len(logged["sparsity/head.weight"]) == 2  # one per validation epoch, none for the sanity check
    assert logged["sparsity/head.weight"][-1] == pytest.approx(0.5)
    assert logged["sparsity/backbone.1.weight"][-1] == 0.0
    total = 784 * 16 + 16 * 10
    assert logged["sparsity/global"][-1] == pytest.approx(80 / total)
    histogram = run.Histograms("weights/head.weight")[-1].histogram_value
    assert histogram.num == 160 and histogram.min == pytest.approx(float(model.net.head.weight.min()))


def test_views_need_no_tensorboard_logger(fake_mnist_dir: Path, tmp_path: Path) -> None:
    model = ImageClassifier(10, arch="mlp", arch_kwargs={"hidden": [8]})
    data = MNISTDataModule(data_dir=str(fake_mnist_dir), download=False, val_size=64, batch_size=64)
    trainer = Trainer(fast_dev_run=True, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                      enable_progress_bar=False, callbacks=[TensorBoardViews()])
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)
    assert not list(tmp_path.rglob("events.out.tfevents*"))
