"""What the callbacks share about the task they act on: its network, its input, its figures.

Callbacks find the network by name (``pl_module.net``, else the module itself) and never by model class.
"""

import torch
from lightning import LightningModule
from torch import nn

from project.compression import export
from project.compression.measure import STATS_KEYS, format_table, model_stats
from project.errors import UserError


def network_of(pl_module: LightningModule) -> nn.Module:
    """The plain network inside the task (``pl_module.net``), or the module itself."""
    net = getattr(pl_module, "net", None)
    return net if isinstance(net, nn.Module) else pl_module


def network_prefix(pl_module: LightningModule) -> str:
    """Prefix of the network's names inside the task's ``state_dict`` (``"net."``)."""
    return "net." if network_of(pl_module) is not pl_module else ""


def input_shape(pl_module: LightningModule) -> tuple[int, ...]:
    """``(C, H, W)`` of one input, from the task's ``example_input_array`` or its hparams."""
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor) and example.dim() >= 2:
        return tuple(example.shape[1:])
    hp = getattr(pl_module, "hparams", {})
    if "in_channels" in hp and "image_size" in hp:
        return (int(hp["in_channels"]), int(hp["image_size"]), int(hp["image_size"]))
    raise UserError(
        f"{type(pl_module).__name__} gives no input shape: give it an example_input_array or "
        "in_channels/image_size hyperparameters"
    )


def example_input(pl_module: LightningModule, batch: int = 1) -> torch.Tensor:
    """A fresh random input shaped like the task's input, on its device (never a data slice)."""
    return export.example_input(input_shape(pl_module), batch, device=pl_module.device)


def stats(pl_module: LightningModule) -> dict[str, float]:
    """:func:`~project.compression.measure.model_stats` of the task's network on a one-image input."""
    return model_stats(network_of(pl_module), example_input(pl_module))


def print_table(title: str, before: dict[str, float] | None, after: dict[str, float]) -> None:
    rows = {"before": before, "after": after} if before else {"after": after}
    print(f"\n{title}\n{format_table(rows, STATS_KEYS)}\n", flush=True)


def check_not_quantized(pl_module: LightningModule, who: str) -> None:
    """Pruning callbacks must see the plain network: QAT replaces it by a traced GraphModule."""
    if isinstance(network_of(pl_module), torch.fx.GraphModule):
        raise UserError(
            f"{who} found an already traced/quantized network: list it before QuantizationAwareTraining"
            " in trainer.callbacks so it sets up first"
        )
