"""Lightning's ModelCheckpoint, with ``last.ckpt`` written after every validation."""

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state.

    Lightning 2.6 rewrites ``last.ckpt`` (at a training epoch end, its default with one validation per
    epoch, or at a validation end) only when a top-k checkpoint was saved at the same step, so after an
    epoch that did not improve the monitored metric ``last.ckpt`` is stale and ``--ckpt_path last`` would
    silently repeat epochs.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def _save_last_if_stale(self, trainer: Trainer) -> None:
        # _should_skip_saving_checkpoint is also true once anything was saved at this step
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def restart_best_checkpoint_tracking(trainer: Trainer) -> None:
    """Forget the "best" checkpoints seen so far, so only models of the final shape/sparsity compete.

    Without this a dense model from before pruning, with its higher validation accuracy, would
    stay the best checkpoint and be the one tested after fit.
    """
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor is not None:
            for path in cb.best_k_models:  # their files would otherwise linger, e.g. as best.ckpt beside best-v1.ckpt
                if path != cb.last_model_path:
                    trainer.strategy.remove_checkpoint(path)
            cb.best_k_models = {}
            cb.kth_best_model_path = ""
            cb.best_model_score = None
            cb.best_model_path = ""
            cb.kth_value = torch.tensor(torch.inf if cb.mode == "min" else -torch.inf)
