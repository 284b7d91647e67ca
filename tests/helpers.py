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
