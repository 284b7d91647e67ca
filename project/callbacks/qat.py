"""``QuantizationAwareTraining``: int8 QAT of ``pl_module.net`` through torch.export + torchao PT2E.

What it does, and why it avoids what broke Lightning's old QAT callback:

- At ``setup`` (before any checkpoint is restored, before DDP wraps the module, before the optimizer
  is built) it replaces ``pl_module.net`` with the prepared, fake-quantized GraphModule. The module's
  ``forward`` is not patched, the optimizer sees the prepared parameters from the start, and a
  checkpoint of any epoch has the same keys, so resuming (``--ckpt_path``) restores QAT exactly:
  weights, observer ranges, scales, and which of them are still updating (all are buffers).
- Before ``start_epoch`` fake quantization and observers are off: the prepared model computes in
  float (conv-BN is folded mathematically, with the same result), so "QAT from epoch k" needs no
  model swap and no optimizer rebuild mid-fit.
- Observers stop updating from ``freeze_observers_epoch``, BatchNorm statistics from
  ``freeze_bn_epoch`` (torchvision's QAT recipe). Observers are also paused during validation and
  test, so evaluation data never moves the quantization ranges.
- At validation and test an int8-converted *copy* is evaluated on the same batches and
  ``val/acc_int8`` / ``test/acc_int8`` are logged; the training model is never converted.
- ``fit`` ships the converted model (``--export``, :mod:`project.fit_artifacts`) as ``<log_dir>/model.pt2``, a
  program taking [0, 1] images, and in ONNX and OpenVINO as QDQ with the learned scales.
- Weights that are exactly zero when training starts (e.g. after pruning) are kept at zero.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn

from project.callbacks._task import input_shape
from project.callbacks.checkpoint import restart_best_checkpoint_tracking
from project.checkpoints import ChangesNetwork
from project.compression import quantization as Q
from project.compression.graph_mode import freeze_bn
from project.errors import UserError


class QuantizationAwareTraining(Callback, ChangesNetwork):
    """Quantization-aware training to int8 (x86 CPU backend) of the task's ``net``.

    Args:
        start_epoch: First epoch trained with fake quantization (0: the whole fit). Earlier epochs
            train in float. To fine-tune a float checkpoint, load it with the model's ``init_from``
            and keep 0.
        freeze_observers_epoch: From this epoch on, the activation and weight ranges (scales, zero
            points) stop updating. ``None``: they update until the end.
        freeze_bn_epoch: From this epoch on, BatchNorm normalizes with its running statistics and
            stops updating them. ``None``: never frozen.
        evaluate_int8: Evaluate an int8-converted copy at each validation and test and log
            ``val/acc_int8`` / ``test/acc_int8``.
        keep_sparsity: Keep weights that are exactly zero when training starts at zero (pruned weights).
        reduce_range: Quantize activations to 7 bits. ``None`` (default): on exactly where the CPU has no VNNI,
            whose int8 kernels saturate on full-range activations (:mod:`project.compression.cpu`). Set it to
            train on one machine for another; a resumed run must keep the value it started with.
    """

    def __init__(
        self,
        start_epoch: int = 0,
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        evaluate_int8: bool = True,
        keep_sparsity: bool = True,
        reduce_range: bool | None = None,
    ) -> None:
        if start_epoch < 0:
            raise UserError(f"QAT start_epoch must be >= 0, got {start_epoch}")
        if freeze_observers_epoch is not None and freeze_observers_epoch <= start_epoch:
            raise UserError(
                f"QAT freeze_observers_epoch ({freeze_observers_epoch}) must be > start_epoch ({start_epoch}): "
                "the observers need at least one QAT epoch to measure the ranges"
            )
        if freeze_bn_epoch is not None and freeze_bn_epoch < 0:
            raise UserError(f"QAT freeze_bn_epoch must be >= 0 or null, got {freeze_bn_epoch}")
        Q.require_torchao()
        self.start_epoch = start_epoch
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.evaluate_int8 = evaluate_int8
        self.keep_sparsity = keep_sparsity
        self.reduce_range = reduce_range
        self._prepared: nn.Module | None = None
        self._input_shape: tuple[int, ...] = ()
        self._masks: dict[str, torch.Tensor] = {}
        self._int8: nn.Module | None = None
        self._counts = torch.zeros(2, dtype=torch.long)
        self._paused_observers: list[bool] = []

    # ---- checkpoints of QAT runs -------------------------------------------------------------------

    @classmethod
    def needed_for(cls, checkpoint: dict[str, Any]) -> str | None:
        if any(".activation_post_process" in k for k in checkpoint.get("state_dict", {})):  # fake-quant state
            return (
                "was taken during quantization-aware training: add the "
                "project.callbacks.QuantizationAwareTraining callback (see configs/qat/) to resume or test it"
            )
        return None

    CHECKPOINT_KEY = "int8_settings"  # how the run quantizes, kept in its checkpoints (not callback state,
    # which would make two QAT callbacks a Lightning error before the one-line refusal in setup)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        settings = getattr(self._prepared, Q.SETTINGS_ATTR, None)
        if settings:
            checkpoint[self.CHECKPOINT_KEY] = dict(settings)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get(self.CHECKPOINT_KEY) or {}).get("reduce_range")
        now = (getattr(self._prepared, Q.SETTINGS_ATTR, None) or {}).get("reduce_range")
        if saved is not None and now is not None and saved != now:
            raise UserError(
                f"this QAT checkpoint was trained with reduce_range={saved} but this run quantizes with "
                f"reduce_range={now} (chosen from this CPU): set the callback's reduce_range: {str(saved).lower()}"
            )

    # ---- preparing the model ---------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        net = getattr(pl_module, "net", None)
        if net is not None and net is self._prepared:
            return  # already prepared by this callback (e.g. test after fit)
        if not isinstance(net, nn.Module):
            raise UserError(
                f"QuantizationAwareTraining needs a model with a `net` module (like ImageClassifier); "
                f"{type(pl_module).__name__} has none"
            )
        epochs = trainer.max_epochs
        if stage == "fit" and not trainer.fast_dev_run and epochs is not None and 0 <= epochs <= self.start_epoch:
            raise UserError(
                f"QAT start_epoch ({self.start_epoch}) is not below trainer.max_epochs ({epochs}): "
                "QAT would never run; lower start_epoch or raise max_epochs"
            )
        self._input_shape = input_shape(pl_module)
        prepared = Q.prepare_qat(net, self._input_shape, self.reduce_range)
        pl_module.net = prepared
        self._prepared = prepared
        # Until the schedule says otherwise (and unless a checkpoint restores them), compute in float.
        Q.set_fake_quant(prepared, self.start_epoch == 0)
        Q.set_observers(prepared, self.start_epoch == 0)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After checkpoint restore: the zeros seen now are the pruned weights to keep.
        self._masks = {}
        if self.keep_sparsity:
            for name, param in pl_module.net.named_parameters():
                if param.dim() > 1 and not bool(param.all()):
                    self._masks[name] = param.detach() != 0

    # ---- the schedule ------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.apply_schedule(pl_module.net, trainer.current_epoch)
        if trainer.current_epoch == self.start_epoch > 0:
            # only fake-quantized models compete for best.ckpt, which fit then tests
            restart_best_checkpoint_tracking(trainer)

    def apply_schedule(self, net: nn.Module, epoch: int) -> None:
        """Set fake quantization, observers and BatchNorm freezing for ``epoch``."""
        active = epoch >= self.start_epoch
        Q.set_fake_quant(net, active)
        observing = active and (self.freeze_observers_epoch is None or epoch < self.freeze_observers_epoch)
        Q.set_observers(net, observing)
        freeze_bn(net, self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._masks:
            params = dict(pl_module.net.named_parameters())
            with torch.no_grad():
                for name, mask in self._masks.items():
                    params[name].mul_(mask)

    # ---- int8 evaluation -----------------------------------------------------------------------------

    def _start_eval(self, trainer: Trainer, pl_module: LightningModule) -> None:
        net = pl_module.net
        fqs = Q.fake_quantizers(net)
        self._paused_observers = [bool(fq.observer_enabled.item()) for fq in fqs]
        Q.set_observers(net, False)
        self._counts = torch.zeros(2, dtype=torch.long)
        self._int8 = None
        quantizing = any(bool(fq.fake_quant_enabled.item()) for fq in fqs)
        if self.evaluate_int8 and quantizing and not trainer.sanity_checking:
            self._int8 = Q.convert_copy(net)

    def _eval_batch(self, batch: Any) -> None:
        if self._int8 is None:
            return
        images, labels = batch[0], batch[1]
        with torch.no_grad():
            preds = self._int8(images).argmax(dim=-1)
        self._counts += torch.stack([(preds == labels).sum().cpu(), torch.tensor(labels.numel())])

    def _end_eval(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for fq, enabled in zip(Q.fake_quantizers(pl_module.net), self._paused_observers):
            fq.enable_observer(enabled)
        if self._int8 is None:
            return
        counts = trainer.strategy.reduce(self._counts.to(pl_module.device), reduce_op="sum")
        if counts[1] > 0:
            acc = counts[0].float() / counts[1].float()
            pl_module.log(f"{stage}/acc_int8", acc, prog_bar=True, sync_dist=True)
        self._int8 = None

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_eval(trainer, pl_module)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_eval(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_eval(trainer, pl_module)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_eval(trainer, pl_module, "test")
