"""ImageClassifier's training logging: the loss only on logging steps with an exact epoch mean, and epoch metrics
that cover every training prediction of their epoch."""

import csv
import math

import torch
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from project.tasks import ImageClassifier
from project.tasks.metrics import TRAIN_METRICS_EVERY, stage_metrics


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append((float(outputs["loss"]), len(batch[1])))


def test_train_loss_steps_and_exact_epoch_mean(tmp_path) -> None:
    seed_everything(0)
    data = TensorDataset(torch.randn(44, 1, 28, 28), torch.randint(0, 10, (44,)))
    loader = DataLoader(data, batch_size=8)  # 6 steps, the last of 4 samples
    model, record = ImageClassifier(10, 1, 28, arch="mlp"), _Losses()
    trainer = Trainer(max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=2, callbacks=[record],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)

    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    step_rows = [r for r in rows if r.get("train/loss_step")]
    assert [int(r["step"]) for r in step_rows] == [1, 3, 5]  # every 2nd step only
    for r in step_rows:
        assert float(r["train/loss_step"]) == record.losses[int(r["step"])][0]
    epoch = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    weighted = sum(loss * n for loss, n in record.losses) / sum(n for _, n in record.losses)
    assert len(epoch) == 1 and math.isclose(epoch[0], weighted, rel_tol=1e-5)
    assert not math.isclose(weighted, sum(loss for loss, _ in record.losses) / len(record.losses), rel_tol=1e-6)


class _EpochLosses(_Losses):
    """Records step losses and, at each epoch end, the epoch loss Lightning hands to callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[tuple[list[tuple[float, int]], float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append((self.losses, float(trainer.callback_metrics["train/loss_epoch"])))
        self.losses = []


def test_epoch_loss_is_exact_over_many_steps_and_restarts_each_epoch(tmp_path) -> None:
    seed_everything(0)
    n_steps = 2 * TRAIN_METRICS_EVERY + 3  # step losses reach the mean in chunks, the rest at epoch end
    n = 4 * n_steps - 2
    loader = DataLoader(TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))), batch_size=4,
                        shuffle=True)  # a last batch of 2
    model, record = ImageClassifier(10, 1, 28, arch="mlp"), _EpochLosses()
    trainer = Trainer(max_epochs=2, logger=False, callbacks=[record], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)

    assert len(record.epochs) == 2
    for losses, epoch_loss in record.epochs:
        assert len(losses) == n_steps
        weighted = sum(loss * k for loss, k in losses) / sum(k for _, k in losses)
        assert math.isclose(epoch_loss, weighted, rel_tol=1e-5)
    assert not math.isclose(record.epochs[0][1], record.epochs[1][1], rel_tol=1e-3)  # the mean restarted


def test_step_logging_off_still_logs_the_epoch_loss(tmp_path) -> None:
    loader = DataLoader(TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))), batch_size=8)
    model = ImageClassifier(10, 1, 28, arch="mlp")
    trainer = Trainer(max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=0, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    assert "train/loss_epoch" in trainer.callback_metrics and "train/loss_step" not in trainer.callback_metrics



def test_train_metrics_cover_every_prediction_of_the_epoch(tmp_path, monkeypatch) -> None:
    seed_everything(0)
    n_steps = 2 * TRAIN_METRICS_EVERY + 3  # predictions reach torchmetrics in chunks and at epoch end
    data = TensorDataset(torch.randn(4 * n_steps - 2, 1, 28, 28), torch.randint(0, 10, (4 * n_steps - 2,)))
    loader = DataLoader(data, batch_size=4, shuffle=True)  # a last batch of 2
    model = ImageClassifier(10, 1, 28, arch="mlp")
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    original = ImageClassifier.update_train_metrics

    def spy(self, logits, labels):
        seen.append((self.current_epoch, logits.detach().clone(), labels.clone()))
        original(self, logits, labels)

    monkeypatch.setattr(ImageClassifier, "update_train_metrics", spy)
    trainer = Trainer(max_epochs=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)

    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/acc")]
    assert len(seen) == 2 * n_steps and len(logged) == 2
    for epoch in (0, 1):
        expected = stage_metrics(10, "train/")
        for e, logits, labels in seen:
            if e == epoch:
                expected.update(logits, labels)
        for key, value in expected.compute().items():
            assert math.isclose(float(logged[epoch][key]), float(value), rel_tol=1e-6), (epoch, key)
    assert logged[0]["train/acc"] != logged[1]["train/acc"]  # each epoch counts only its own predictions
