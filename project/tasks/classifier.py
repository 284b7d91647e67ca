"""``ImageClassifier``: a backbone with its head, cross-entropy, and per-stage metrics."""

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from torchmetrics.classification import MulticlassPrecision, MulticlassRecall

from project.models import build_network


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


def _stage_metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
    )


class ImageClassifier(LightningModule):
    """Image classification: ``arch`` backbone + linear head, trained with cross-entropy.

    ``num_classes``, ``in_channels`` and ``image_size`` come from the DataModule (the CLI
    links them), so configs never type them.

    Args:
        num_classes: Number of classes (2 for a binary task).
        in_channels: Image channels.
        image_size: Image height and width.
        arch: Backbone name: ``mlp``, ``lenet5``, ``cnn``, ``resnet9`` or ``resnet18``.
        arch_kwargs: Extra keyword arguments for the backbone (e.g. ``{"channels": [32, 64]}``).
        label_smoothing: Cross-entropy label smoothing in [0, 1).
        optimizer: Optimizer class and arguments (``class_path`` / ``init_args`` in YAML).
        lr_scheduler: Optional LR schedule. Schedules with a ``total_steps`` argument left
            unset (``OneCycleLR``, ``project.tasks.WarmupCosineLR``) get the run's length
            and step every batch; others step every epoch.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
        arch: str = "lenet5",
        arch_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net: nn.Module = build_network(arch, num_classes, in_channels, image_size, **(arch_kwargs or {}))
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.label_smoothing = label_smoothing
        self.train_metrics = _stage_metrics(num_classes, "train/")
        self.val_metrics = _stage_metrics(num_classes, "val/")
        self.test_metrics = _stage_metrics(num_classes, "test/")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.example_input_array = torch.zeros(2, in_channels, image_size, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        if stage == "test":
            self.test_confusion.update(logits.detach(), labels)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(images).softmax(dim=-1)
        return {"pred": probs.argmax(dim=-1), "prob": probs}

    def on_test_epoch_end(self) -> None:
        confusion = self.test_confusion.compute()
        self.test_confusion.reset()
        if self.trainer.is_global_zero:
            from project.reporting import log_confusion_matrix

            log_confusion_matrix(self.trainer, confusion, tag="test/confusion_matrix")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one group of every trainable parameter."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameter_groups())
        if self.lr_scheduler is None:
            return optimizer
        kwargs = {}
        target = getattr(self.lr_scheduler, "func", self.lr_scheduler)
        target = getattr(self.lr_scheduler, "args", [target])[-1] if not inspect.isclass(target) else target
        steps_per_batch = "total_steps" in inspect.signature(target).parameters
        if steps_per_batch and getattr(self.lr_scheduler, "keywords", {}).get("total_steps") is None:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.lr_scheduler(optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step" if steps_per_batch else "epoch"},
        }
