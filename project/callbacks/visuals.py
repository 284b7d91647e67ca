"""``TensorBoardViews``: the TensorBoard pages a person looks at rather than reads.

- at each validation epoch end: a histogram of every layer's weights (``weights/<layer>``), each layer's
  sparsity, i.e. its fraction of exact zeros (``sparsity/<layer>`` and ``sparsity/global`` scalars), and a
  bar chart of the per-layer sparsity (``sparsity/per_layer`` image);
- at test end: a grid of misclassified test images titled with predicted and true labels
  (``test/misclassified``).

The test confusion matrix and the hparams table are logged by the task and the CLI
(:mod:`project.reporting`). Only the task's network (``pl_module.net``) is looked at: a
distillation teacher never shows up. Without a TensorBoard logger the callback does nothing.
"""

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn

from project.callbacks._task import network_of
from project.compression.sparsity import sparsity_of
from project.reporting import tensorboard_logger


def layer_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    """The weight tensors of ``net``'s conv and linear layers (every parameter with >= 2 dims), by name.

    Going by parameters rather than module types also covers networks rewritten for quantization
    (exported graphs keep the parameter names but not the layer classes).
    """
    return {name: p.detach() for name, p in net.named_parameters() if p.dim() >= 2 and p.is_floating_point()}


def sparsity_figure(sparsity: dict[str, float]) -> Any:
    """A horizontal bar chart of per-layer sparsity in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sparsity)
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(names) + 1.2))
    ax.barh(range(len(names)), [sparsity[n] for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of zero weights")
    fig.tight_layout()
    return fig


def misclassified_figure(
    images: torch.Tensor,
    preds: torch.Tensor,
    targets: torch.Tensor,
    class_names: list[str] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    columns: int = 8,
) -> Any:
    """A grid of images ``[N, C, H, W]`` titled ``pred / true``; ``mean``/``std`` undo the normalisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = images.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:  # unknown normalisation: stretch each image to [0, 1]
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        x = (x - low) / (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp(min=1e-8)
    x = x.clamp(0, 1)
    n = len(x)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    name = (lambda i: class_names[i]) if class_names else str
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        img = x[i].permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(f"{name(int(preds[i]))} / {name(int(targets[i]))}", fontsize=7, color="tab:red")
    fig.suptitle("misclassified: predicted / true", fontsize=9)
    fig.tight_layout()
    return fig


class TensorBoardViews(Callback):
    """Weight and sparsity views at each validation epoch end, misclassified test images at test end.

    Args:
        weight_histograms: Log a histogram of each layer's weights (``weights/<layer>``).
        sparsity: Log each layer's fraction of zero weights (``sparsity/<layer>``, ``sparsity/global``)
            and a bar chart of it (``sparsity/per_layer``).
        max_misclassified: How many misclassified test images the ``test/misclassified`` grid shows
            (0 turns the grid off).
    """

    def __init__(self, weight_histograms: bool = True, sparsity: bool = True, max_misclassified: int = 32) -> None:
        if max_misclassified < 0:
            raise ValueError(f"max_misclassified must be >= 0, got {max_misclassified}")
        self.weight_histograms = weight_histograms
        self.sparsity = sparsity
        self.max_misclassified = max_misclassified
        self._wrong: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tb = tensorboard_logger(trainer)
        if tb is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        weights = layer_weights(network_of(pl_module))
        if not weights:
            return
        step = trainer.global_step
        if self.weight_histograms:
            for name, w in weights.items():
                tb.experiment.add_histogram(f"weights/{name}", w.float().cpu(), global_step=step)
        if self.sparsity:
            overall, per_layer = sparsity_of(weights.items())
            for name, value in per_layer.items():
                tb.experiment.add_scalar(f"sparsity/{name}", value, global_step=step)
            tb.experiment.add_scalar("sparsity/global", overall, global_step=step)
            tb.experiment.add_figure("sparsity/per_layer", sparsity_figure(per_layer), global_step=step)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._wrong = []

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        have = sum(len(w[0]) for w in self._wrong)
        if have >= self.max_misclassified or tensorboard_logger(trainer) is None:
            return
        images, targets = batch[0], batch[1]
        if targets.dim() != 1:  # soft labels: no single true class to show
            return
        with torch.no_grad():
            preds = pl_module(images).argmax(dim=-1)
        wrong = (preds != targets).nonzero().flatten()[: self.max_misclassified - have]
        if len(wrong):
            self._wrong.append((images[wrong].cpu(), preds[wrong].cpu(), targets[wrong].cpu()))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tb = tensorboard_logger(trainer)
        wrong, self._wrong = self._wrong, []
        if tb is None or not wrong or not trainer.is_global_zero:
            return
        images, preds, targets = (torch.cat(parts) for parts in zip(*wrong))
        data = trainer.datamodule
        fig = misclassified_figure(
            images,
            preds,
            targets,
            class_names=getattr(data, "class_names", None),
            mean=getattr(data, "mean", None),
            std=getattr(data, "std", None),
        )
        tb.experiment.add_figure("test/misclassified", fig, global_step=trainer.global_step)
