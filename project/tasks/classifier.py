"""``ImageClassifier``: a backbone with its head, cross-entropy, and per-stage metrics."""

import inspect
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassConfusionMatrix

from project.errors import UserError
from project.models import build_network
from project.tasks.init_weights import InitSummary, load_initial_weights
from project.tasks.metrics import TRAIN_METRICS_EVERY, StepMean, stage_metrics
from project.tasks.optim import apply_lr_factors, default_optimizer, scheduler_class


# The training epoch's values are logged already reduced over ranks (see ImageClassifier._log_train_epoch_metrics):
# Lightning's advice to sync them again does not apply.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('train/", category=UserWarning)


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
        init_from: Start from these weights (a new run; ``--ckpt_path`` resumes one instead): a
            checkpoint of this project, a ``state_dict`` file, or a torchvision weights name such as
            ``IMAGENET1K_V1`` (``resnet18`` only). The backbone must fit exactly; the head loads only
            if ``num_classes`` matches, else it is re-initialised. Not saved in the hyperparameters.
        reset_head: With ``init_from``, re-initialise the head even when ``num_classes`` matches
            (a new task with as many classes, e.g. digits 5-9 after digits 0-4).
        backbone_lr_factor: The backbone's LR as a factor of the optimizer's LR (discriminative LRs;
            e.g. 0.1). 1.0 keeps one parameter group. Applies on top of any LR schedule.
        channels_last: Keep weights and activations in channels-last memory format (faster convolutions
            on GPUs with tensor cores, especially with ``bf16-mixed``).
        compile: Compile the network with ``torch.compile`` (in place, so checkpoint keys do not change).
            The first steps are slow while it compiles.
    """

    head_prefix = "net.head."  # the classification head's names in the state_dict

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
        arch: str = "lenet5",
        arch_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_from: str | None = None,
        reset_head: bool = False,
        backbone_lr_factor: float = 1.0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not backbone_lr_factor > 0.0:
            raise UserError(f"backbone_lr_factor must be > 0, got {backbone_lr_factor}; freeze the backbone with project.callbacks.FreezeSchedule instead")
        # init_from is a one-off starting point: a checkpoint of this run rebuilds without it
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "init_from"])
        self.net: nn.Module = build_network(arch, num_classes, in_channels, image_size, **(arch_kwargs or {}))
        # Loading here is safe when resuming: Lightning restores the checkpoint's weights after __init__.
        self.init_summary: InitSummary | None = (
            load_initial_weights(self.net, init_from, arch, load_head=not reset_head) if init_from else None
        )
        self.backbone_lr_factor = backbone_lr_factor
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.label_smoothing = label_smoothing
        self.train_metrics = stage_metrics(num_classes, "train/")
        self.val_metrics = stage_metrics(num_classes, "val/")
        self.test_metrics = stage_metrics(num_classes, "test/")
        # Epoch losses as torchmetrics means: their float sums sync exactly under DDP (self.log's sync_dist
        # floors its integer sample count when the ranks hold unequal shards, Lightning #21859).
        self.train_loss = StepMean()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self._train_batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # (preds, labels), see update_train_metrics
        self._train_epoch_logged = False
        self.example_input_array = torch.zeros(2, in_channels, image_size, image_size)
        self.channels_last = channels_last
        self.compile_net = compile
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name around each of the ~23 hooks it calls per training step; it is never
        # a parameter, buffer or submodule, so nn.Module's checks (ten times a plain assignment) are skipped.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def configure_model(self) -> None:
        if self.compile_net and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        if stage == "train":
            self.update_train_metrics(logits, labels)
            self.log_train_loss(loss, labels.numel())
            return loss
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), labels)
        mean: MeanMetric = getattr(self, f"{stage}_loss")
        mean.update(loss.detach(), weight=labels.numel())
        self.log(f"{stage}/loss", mean, on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)
        if stage == "test":
            self.test_confusion.update(logits.detach(), labels)
        return loss

    def update_train_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Collect a training batch's predicted classes for ``train_metrics``.

        Updating the four torchmetrics objects at every step costs as much as Lightning's own per-step loop
        on a small CPU model, so the predictions are gathered and handed to them every ``TRAIN_METRICS_EVERY`` steps and at epoch end:
        the same epoch values, with bounded memory.
        """
        self._train_batches.append((logits.detach().argmax(dim=-1), labels))
        if len(self._train_batches) >= TRAIN_METRICS_EVERY:
            self._flush_train_metrics()

    def _flush_train_metrics(self) -> None:
        if self._train_batches:
            preds, labels = zip(*self._train_batches)
            self.train_metrics.update(torch.cat(preds), torch.cat(labels))
            self._train_batches.clear()

    def log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """Log ``train/loss_step`` on the steps the logger writes, and ``train/loss_epoch`` at epoch end.

        ``self.log`` costs Lightning about as much bookkeeping as a small model's whole step, so it is
        called only on the steps that ``trainer.log_every_n_steps`` writes (the same curve as logging
        every step). The epoch mean is a :class:`StepMean` of every step (exact under DDP and with a
        smaller last batch), reduced and logged once per epoch by :meth:`_log_train_epoch_metrics`.
        """
        self.train_loss.add(loss, batch_size)
        every = self.trainer.log_every_n_steps  # 0 turns step logging off, as in Lightning
        if (every and (self.global_step + 1) % every == 0) or self.trainer.fast_dev_run:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)

    def on_train_epoch_start(self) -> None:
        self._train_batches.clear()  # left over only if the previous epoch was interrupted
        self.train_loss.reset()
        self._train_epoch_logged = False

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        loop = self.trainer.fit_loop.epoch_loop
        if batch_idx + 1 >= self.trainer.num_training_batches or loop.batch_progress.is_last_batch:
            self._log_train_epoch_metrics()

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

    def on_train_epoch_end(self) -> None:
        self._log_train_epoch_metrics()  # an epoch cut short (max_steps) had no last batch

    def _log_train_epoch_metrics(self) -> None:
        """Reduce the epoch's training loss and metrics over DDP ranks, then log them as plain numbers.

        Every rank calls this at the same point (the end of its last training batch, and every rank has as
        many batches), so the ranks' collectives pair up. What Lightning holds for the training epoch is then
        already reduced and needs no collective of its own: Lightning computes logged metric *objects*
        lazily, whenever results are first read, and rank 0's progress bar reads them at
        ``on_train_epoch_end`` while the other ranks do not, so any collective of the module's own between
        that read and the other ranks' would pair rank 0's gather with another rank's different one.
        Runs once per epoch; the values reach callbacks' ``on_train_epoch_end`` through ``callback_metrics``.
        """
        if self._train_epoch_logged:
            return
        self._train_epoch_logged = True
        self._flush_train_metrics()
        metrics = {"train/loss_epoch": self.train_loss.compute(), **self.train_metrics.compute()}
        self.train_loss.reset()
        self.train_metrics.reset()
        for name, value in metrics.items():
            self.log(name, value, on_step=False, on_epoch=True, prog_bar=name == "train/loss_epoch", batch_size=1)

    def on_test_epoch_end(self) -> None:
        confusion = self.test_confusion.compute()
        self.test_confusion.reset()
        if self.trainer.is_global_zero:
            from project.reporting import log_confusion_matrix

            log_confusion_matrix(self.trainer, confusion, tag="test/confusion_matrix")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, of trainable parameters only (frozen ones are left out).

        One group, or with ``backbone_lr_factor != 1`` two: ``"head"`` (everything outside the backbone)
        and ``"backbone"``, whose ``lr_factor`` key :meth:`configure_optimizers` applies to its LRs.
        Empty groups are dropped.
        """
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            raise UserError("no trainable parameters: the freezing callback froze the whole model; leave the head (net.head) out of its frozen modules")
        if self.backbone_lr_factor == 1.0:
            return [{"params": trainable}]
        backbone = {id(p) for p in self.net.backbone.parameters()}
        groups = [
            {"name": "head", "params": [p for p in trainable if id(p) not in backbone]},
            {"name": "backbone", "params": [p for p in trainable if id(p) in backbone], "lr_factor": self.backbone_lr_factor},
        ]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        try:
            optimizer = self.optimizer(self.parameter_groups())
        except ValueError as err:  # torch's own checks: negative lr, betas out of range, ...
            raise UserError(f"the optimizer rejected its arguments ({err}): fix model.init_args.optimizer") from None
        if self.lr_scheduler is None:
            apply_lr_factors(optimizer, None)
            return optimizer
        kwargs = {}
        steps_per_batch = "total_steps" in inspect.signature(scheduler_class(self.lr_scheduler)).parameters
        if steps_per_batch and getattr(self.lr_scheduler, "keywords", {}).get("total_steps") is None:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.lr_scheduler(optimizer, **kwargs)
        apply_lr_factors(optimizer, scheduler)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step" if steps_per_batch else "epoch"},
        }
