"""What a person looks at in TensorBoard beyond scalars: images and the hparams table."""

from collections.abc import Mapping
from typing import Any

import torch
from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def tensorboard_logger(trainer: Trainer) -> TensorBoardLogger | None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger
    return None


def confusion_matrix_figure(confusion: torch.Tensor, class_names: list[str] | None = None) -> Any:
    """A matplotlib figure of a confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion.detach().cpu().float()
    n = cm.shape[0]
    names = class_names or [str(i) for i in range(n)]
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm / cm.sum(dim=1, keepdim=True).clamp(min=1), cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(n), names, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def log_confusion_matrix(trainer: Trainer, confusion: torch.Tensor, tag: str) -> None:
    """Log ``confusion`` as an image to the run's TensorBoard (no-op without a TensorBoard logger)."""
    tb = tensorboard_logger(trainer)
    if tb is None:
        return
    class_names = getattr(trainer.datamodule, "class_names", None) if trainer.datamodule is not None else None
    tb.experiment.add_figure(tag, confusion_matrix_figure(confusion, class_names), global_step=trainer.global_step)


def log_hparams_with_metrics(trainer: Trainer, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Write the hparams table entry of this run, with its final metrics, to TensorBoard."""
    tb = tensorboard_logger(trainer)
    if tb is None or not trainer.is_global_zero:
        return
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
    tb.log_hyperparams(flat, metrics=dict(metrics))
    # Lightning closed the writer when fit/test ended; writing reopened it with a daemon flush thread that
    # dies at interpreter exit, taking the queued entry with it. Closing writes it and stops the thread.
    tb.experiment.close()
