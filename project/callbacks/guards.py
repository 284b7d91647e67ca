"""Stop a run cleanly when training diverges."""

import math
from typing import Any

from lightning import Callback, LightningModule, Trainer

from project.errors import UserError


class NonFiniteLossGuard(Callback):
    """Stops training with a one-line message naming the epoch and step when the loss is NaN or infinite.

    The check runs right after the step that produced the loss, before any checkpoint of the epoch is
    written, so ``best.ckpt`` and ``last.ckpt`` keep the last finite weights.
    """

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss.detach())
        if not math.isfinite(value):
            raise UserError(
                f"the training loss became {value} at epoch {trainer.current_epoch}, step {trainer.global_step}:"
                " training stopped and the saved checkpoints keep the last finite weights;"
                " lower the learning rate or check the data"
            )
