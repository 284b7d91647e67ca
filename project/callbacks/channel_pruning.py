"""``ChannelPruning``: remove whole filters/channels with torch-pruning, fine-tune the smaller dense model.

The pruned network really is smaller: fewer parameters, fewer MACs, faster on CPU. ``fit`` ships it
(``--export``, :mod:`project.fit_artifacts`) as ``<log_dir>/model.pt2`` (``torch.export``, taking [0, 1] images),
which loads with ``torch.export.load(path).module()`` in a process that has only torch: no project
code, no pickled classes. The Lightning checkpoints hold the pruning *plan* in the callback state;
with this callback configured, ``--ckpt_path`` (resume, test) first shrinks the network to
the checkpoint's shapes (``shrink_to_state_dict``), then loads the weights.
"""

import copy
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from project.callbacks._task import (
    check_not_quantized,
    example_input,
    network_of,
    network_prefix,
    print_table,
    stats,
)
from project.callbacks.checkpoint import restart_best_checkpoint_tracking
from project.checkpoints import ChangesNetwork
from project.compression.sparsity import check_sparsity, select_modules
from project.compression.structured import (
    Plan,
    apply_plan,
    check_structured_targets,
    compute_plan,
    shrink_to_state_dict,
)
from project.errors import UserError


class ChannelPruning(Callback, ChangesNetwork):
    """Remove the output channels of conv/linear layers with the smallest L1 or L2 norm.

    Pruning happens once, at the start of epoch ``epoch``. With ``epoch: 0`` (the usual case,
    after ``init_from`` a trained model) it happens in ``setup``, before the optimizer and the
    DDP wrapper exist, so it works under DDP as is. With ``epoch > 0`` the model trains dense
    first, then is pruned and the optimizer is rebuilt for the new parameters (its state, and
    the LR schedule's, start afresh); that path runs on one device only.

    Args:
        amount: Fraction of each selected layer's output channels to remove, in [0, 1).
        norm: 1 or 2: rank channels by the L1 or L2 norm of their weights (the whole group:
            filter, BatchNorm scale and the consumers' input weights).
        scope: ``layer``: remove ``amount`` of each layer's channels; ``global``: one ranking
            across layers (torch-pruning's global pruning).
        epoch: Prune at the start of this epoch (0: before training).
        module_types: Layer classes whose output channels are pruned (``Conv2d``, ``Linear``).
        include: Regular expression a layer name must contain (``re.search``), e.g. ``"features"``.
        exclude: Regular expression of layer names left whole. The classification head
            (``net.head``) is always left whole: it produces the class scores.
        round_to: Keep channel counts a multiple of this (e.g. 8 for SIMD-friendly widths).
    """

    def __init__(
        self,
        amount: float = 0.5,
        norm: int = 2,
        scope: Literal["layer", "global"] = "layer",
        epoch: int = 0,
        module_types: list[str] | None = None,
        include: str | None = None,
        exclude: str | None = None,
        round_to: int | None = None,
    ) -> None:
        super().__init__()
        check_sparsity(amount, "channel pruning amount")
        if norm not in (1, 2):
            raise UserError(f"channel pruning norm must be 1 (L1) or 2 (L2), got {norm}")
        if scope not in ("layer", "global"):
            raise UserError(f"channel pruning scope must be 'layer' or 'global', got {scope!r}")
        if epoch < 0:
            raise UserError(f"channel pruning epoch must be >= 0, got {epoch}")
        if round_to is not None and round_to < 1:
            raise UserError(f"round_to must be >= 1, got {round_to}")
        self.amount = amount
        self.norm = norm
        self.scope = scope
        self.epoch = epoch
        self.module_types = list(module_types or ["Conv2d", "Linear"])
        self.include = include
        self.exclude = exclude
        self.round_to = round_to
        # state saved in checkpoints
        self.plan: Plan = []
        self.pruned = False
        self.before: dict[str, float] | None = None
        self._targets: list[str] = []
        self._dense: torch.nn.Module | None = None
        self._hook: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(amount=self.amount, include=self.include, exclude=self.exclude)

    @classmethod
    def needed_for(cls, checkpoint: dict[str, Any]) -> str | None:
        if cls._pruned_in(checkpoint):
            return (
                "is channel-pruned (smaller layers): run with the ChannelPruning callback of the config that"
                " trained it, which shrinks the network to its shapes"
            )
        return None

    def fits_network_to(self, checkpoint: dict[str, Any]) -> bool:
        return self._pruned_in(checkpoint)  # the load hook shrinks the network to the checkpoint's shapes

    @classmethod
    def _pruned_in(cls, checkpoint: dict[str, Any]) -> bool:
        states = (checkpoint.get("callbacks") or {}).items()
        return any(key.startswith(cls.__qualname__) and isinstance(s, dict) and s.get("pruned") for key, s in states)

    def _select(self, pl_module: LightningModule) -> list[str]:
        """Names (inside the network) of the layers to prune; the head is never one of them."""
        net, prefix = network_of(pl_module), network_prefix(pl_module)
        matched = select_modules(pl_module, self.module_types, self.include, self.exclude)
        matched = {n: m for n, m in matched.items() if n.startswith(prefix)}
        head = f"{prefix}head" if isinstance(getattr(net, "head", None), torch.nn.Module) else None
        targets = {n: m for n, m in matched.items() if n != head}
        if not targets:
            raise UserError(
                f"channel pruning selects only {head!r}, the classification head, whose outputs are the class"
                " scores and cannot be removed: select other layers with include/exclude"
            )
        check_structured_targets(targets)
        return [n[len(prefix) :] for n in targets]

    def _apply(self, pl_module: LightningModule, plan: Plan) -> None:
        apply_plan(network_of(pl_module), plan, example_input(pl_module))
        self.plan, self.pruned = plan, True

    def _prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        net = network_of(pl_module)
        plan = compute_plan(
            net, example_input(pl_module), self._targets, self.amount, self.norm, self.scope, self.round_to
        )
        # Rank 0 decides so every rank removes the same channels, even from differently initialised weights.
        plan = trainer.strategy.broadcast(plan if trainer.is_global_zero else None, src=0)
        self._apply(pl_module, plan)
        removed = sum(len(e["idxs"]) for e in plan)  # type: ignore[arg-type]
        rank_zero_info(f"channel pruning removed {removed} channels from {len(plan)} layers")

    def _fit_checkpoint_shapes(
        self, pl_module: LightningModule, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        """Before a checkpoint's weights load (resume, test): give the network the checkpoint's shapes."""
        net_prefix = prefix + network_prefix(pl_module)
        net = network_of(pl_module)
        own = net.state_dict()
        if all(state_dict[net_prefix + k].shape == v.shape for k, v in own.items() if net_prefix + k in state_dict):
            return
        if self._dense is not None and net is not pl_module:
            # Pruned here already (epoch 0 in setup), maybe differently: start again from the dense network.
            pl_module.net = net = copy.deepcopy(self._dense).to(pl_module.device)
        shrink_to_state_dict(net, state_dict, example_input(pl_module), prefix=net_prefix)
        self.pruned = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._targets:
            check_not_quantized(pl_module, type(self).__name__)
            self._targets = self._select(pl_module)
        if self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(self._fit_checkpoint_shapes)
        if stage != "fit" or self.pruned:  # e.g. the test that follows fit, on the same model
            return
        if self.epoch > 0 and trainer.world_size > 1:
            raise UserError(
                "channel pruning with epoch > 0 runs on one device only: use epoch: 0 (prune before training,"
                " e.g. after init_from) under DDP"
            )
        if 0 < (trainer.max_epochs or 0) <= self.epoch and not trainer.fast_dev_run:
            raise UserError(f"channel pruning epoch {self.epoch} is never reached: max_epochs is {trainer.max_epochs}")
        self.before = stats(pl_module)
        if self.epoch == 0:
            self._dense = copy.deepcopy(network_of(pl_module)).cpu()
            self._prune(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pruned or trainer.current_epoch < self.epoch:
            return
        self._prune(trainer, pl_module)
        # The optimizer holds the old, larger parameters: build it again for the new ones.
        trainer.strategy.setup_optimizers(trainer)
        restart_best_checkpoint_tracking(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._dense = None
        if trainer.is_global_zero:
            print_table("Channel pruning: network before and after", self.before, stats(pl_module))

    def state_dict(self) -> dict[str, Any]:
        return {"plan": list(self.plan), "pruned": self.pruned, "before": self.before}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The network's shapes were already fitted to the checkpoint's weights as they loaded.
        self.plan = list(state_dict.get("plan", []))
        self.pruned = bool(state_dict.get("pruned", self.pruned))
        self.before = state_dict.get("before", self.before)

