"""Callbacks that tests put into runs from the command line (``--trainer.callbacks+=tests.helpers.X``)."""

from lightning import Callback, LightningModule, Trainer


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAtEpoch`."""


class CrashAtEpoch(Callback):
    """Crash the run when epoch ``epoch`` starts, after the earlier epochs' checkpoints were written.

    Args:
        epoch: The epoch at whose start the run dies.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise SimulatedCrash(f"simulated crash at the start of epoch {self.epoch}")


class SlowDown(Callback):
    """Sleep after every training batch, so a test can kill the run in the middle of an epoch.

    Args:
        seconds: Sleep per batch.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        import time

        time.sleep(self.seconds)


class PoisonWeightsAtEpoch(Callback):
    """Set the first weight tensor to NaN when epoch ``epoch`` starts: the next loss is NaN.

    Args:
        epoch: The epoch at whose start the weights go bad.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            import torch

            with torch.no_grad():
                next(pl_module.net.parameters()).fill_(float("nan"))

