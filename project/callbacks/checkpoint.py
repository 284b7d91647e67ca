"""Lightning's ModelCheckpoint, with ``last.ckpt`` written after every validation."""

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state.

    Lightning 2.6 rewrites ``last.ckpt`` at a validation end only when a top-k checkpoint was
    saved at the same step, so after an epoch that did not improve the monitored metric
    ``last.ckpt`` is stale and ``--ckpt_path last`` would silently repeat epochs.
    """

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
            and not self._should_save_on_train_epoch_end(trainer)
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
