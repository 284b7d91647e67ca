"""``MagnitudePruning``: gradual unstructured L1 magnitude pruning as a Lightning callback.

The masks live in the callback, not in the model: the network keeps its plain parameters
(pruned entries are exact zeros), so every checkpoint's weights load into a
never-pruned model with ``load_state_dict``. The masks and the schedule position travel in
the callback's own checkpoint state, which is what a mid-schedule resume needs.

Nothing of Lightning's ``ModelPruning`` is used: no biases or BatchNorm unless asked, no
lottery-ticket reset, no ``weight_orig``/``weight_mask`` reparametrisation.
"""

from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


from project.callbacks._task import check_not_quantized, network_prefix, print_table, stats
from project.callbacks.checkpoint import restart_best_checkpoint_tracking
from project.compression.sparsity import (
    apply_masks,
    check_sparsity,
    compute_masks,
    cubic_sparsity,
    mask_gradients,
    schedule_points,
    select_modules,
    select_parameters,
    sparsity_of,
)
from project.errors import UserError


class MagnitudePruning(Callback):
    """Prune the smallest-magnitude weights on the cubic schedule of Zhu & Gupta (2017).

    At times ``start, start + frequency, ..., end`` (epochs or optimizer steps completed) the
    sparsity target ``s_t = s_f + (s_i - s_f) (1 - (t - start) / (end - start))^3`` is applied;
    ``end == start`` (or ``end`` unset) is one-shot pruning. The epochs after ``end`` fine-tune
    the sparse model. Pruned weights stay exactly zero: their gradients are masked before every
    optimizer step and the weights re-masked after it.

    Args:
        amount: Final sparsity ``s_f``, in [0, 1): the fraction of selected weights set to zero.
        initial_sparsity: Sparsity ``s_i`` of the first pruning step, in [0, amount].
        start: First pruning time: after this many epochs (``unit: epoch``) or optimizer steps.
        end: Last pruning time, where ``amount`` is reached; unset means ``start`` (one-shot).
        frequency: Epochs or steps between pruning times.
        unit: ``epoch`` (prune at the start of an epoch) or ``step`` (before an optimizer step).
        scope: ``global``: one magnitude threshold across all selected tensors (layers end up
            with different sparsities); ``layer``: each tensor pruned to ``s_t`` on its own.
        module_types: Layer classes from ``torch.nn`` whose parameters are pruned.
        include: Regular expression a module name must contain (``re.search``), e.g.
            ``"backbone"``; names are those of the task, like ``net.backbone.features.0``.
        exclude: Regular expression of module names left dense, e.g. ``"head"``.
        parameter_names: Which parameters of the selected modules to prune; weights only by
            default (add ``bias`` to prune biases too).
        best_checkpoint_after_pruning: Restart the checkpoint's "best" tracking when the final
            sparsity is reached, so the best checkpoint (tested after fit) is a pruned one.
    """

    def __init__(
        self,
        amount: float = 0.9,
        initial_sparsity: float = 0.0,
        start: int = 0,
        end: int | None = None,
        frequency: int = 1,
        unit: Literal["epoch", "step"] = "epoch",
        scope: Literal["global", "layer"] = "global",
        module_types: list[str] | None = None,
        include: str | None = None,
        exclude: str | None = None,
        parameter_names: list[str] | None = None,
        best_checkpoint_after_pruning: bool = True,
    ) -> None:
        super().__init__()
        check_sparsity(amount, "pruning amount")
        check_sparsity(initial_sparsity, "initial_sparsity")
        if initial_sparsity > amount:
            raise UserError(f"initial_sparsity ({initial_sparsity}) must not exceed amount ({amount})")
        if unit not in ("epoch", "step"):
            raise UserError(f"pruning unit must be 'epoch' or 'step', got {unit!r}")
        if scope not in ("global", "layer"):
            raise UserError(f"pruning scope must be 'global' or 'layer', got {scope!r}")
        self.amount = amount
        self.initial_sparsity = initial_sparsity
        self.start = start
        self.end = start if end is None else end
        self.points = schedule_points(self.start, self.end, frequency)
        self.unit = unit
        self.scope = scope
        self.module_types = list(module_types or ["Conv2d", "Linear"])
        self.include = include
        self.exclude = exclude
        self.parameter_names = list(parameter_names or ["weight"])
        self.best_checkpoint_after_pruning = best_checkpoint_after_pruning
        # state saved in checkpoints
        self.masks: dict[str, torch.Tensor] = {}
        self.last_point: int = -1
        self.history: list[dict[str, float]] = []
        self.before: dict[str, float] | None = None
        self._targets: list[str] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(amount=self.amount, include=self.include, exclude=self.exclude)

    # -- configuration checks --------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._targets:  # chosen once: parameter names stay valid when QAT swaps in a GraphModule
            check_not_quantized(pl_module, type(self).__name__)
            modules = select_modules(pl_module, self.module_types, self.include, self.exclude)
            # only the task's network: a distillation teacher (pl_module.teacher) must stay dense
            prefix = network_prefix(pl_module)
            modules = {n: m for n, m in modules.items() if n.startswith(prefix)}
            if not modules:
                raise UserError(f"no selected layer is inside the network ({prefix.rstrip('.')!r}): check include/exclude")
            self._targets = select_parameters(modules, self.parameter_names)
        if stage != "fit":
            return
        limit = trainer.max_epochs if self.unit == "epoch" else trainer.max_steps
        if not trainer.fast_dev_run and limit is not None and limit >= 0 and self.end >= limit:
            raise UserError(
                f"pruning ends at {self.unit} {self.end} but training stops after {limit} {self.unit}s:"
                f" set end < {limit} (and leave some {self.unit}s after it to fine-tune)"
            )
        if self.before is None and trainer.is_global_zero:
            self.before = stats(pl_module)

    # -- the schedule --------------------------------------------------------------------

    def target_sparsity(self, t: int) -> float:
        """The schedule's sparsity at time ``t`` (epochs or steps)."""
        return cubic_sparsity(t, self.start, self.end, self.amount, self.initial_sparsity)

    @property
    def finished(self) -> bool:
        """Whether the last pruning step has been applied."""
        return self.last_point >= self.end

    def _maybe_prune(self, trainer: Trainer, pl_module: LightningModule, t: int) -> None:
        due = [p for p in self.points if self.last_point < p <= t]
        if not due:
            return
        point = due[-1]
        target = self.target_sparsity(point)
        params = {name: pl_module.get_parameter(name) for name in self._targets}
        masks = compute_masks(params, target, self.scope, self.masks or None) if trainer.is_global_zero else None
        # Weights are identical on every rank, but ranking ties could still differ: rank 0 decides.
        masks = trainer.strategy.broadcast(masks, src=0)
        self.masks = {name: m.cpu() for name, m in masks.items()}
        apply_masks(pl_module, self.masks)
        self.last_point = point
        self._log(trainer, pl_module, point, target)
        if self.finished and self.best_checkpoint_after_pruning:
            restart_best_checkpoint_tracking(trainer)

    def _log(self, trainer: Trainer, pl_module: LightningModule, point: int, target: float) -> None:
        overall, per_layer = sparsity_of((name, pl_module.get_parameter(name)) for name in self._targets)
        self.history.append({self.unit: point, "step": trainer.global_step, "target": target, "sparsity": overall})
        # the schedule's own record under pruning/; the layers under the network's names, as TensorBoardViews
        # logs them (sparsity/<layer of the network>), so one tag is one quantity whichever callback wrote it
        prefix = network_prefix(pl_module)
        metrics = {"pruning/sparsity": overall, "pruning/target": target}
        metrics.update({f"sparsity/{name.removeprefix(prefix)}": value for name, value in per_layer.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"pruning at {self.unit} {point}: target {target:.2%}, reached {overall:.2%}")

    # -- hooks ---------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.masks:  # resumed mid-schedule: the masks came back with the callback state
            apply_masks(pl_module, self.masks)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.unit == "epoch":
            self._maybe_prune(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.unit == "step":
            self._maybe_prune(trainer, pl_module, trainer.global_step)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.masks:
            mask_gradients(pl_module, self.masks)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.masks:  # momentum and weight decay can still move a masked weight: put it back to 0
            apply_masks(pl_module, self.masks)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for name, mask in self.masks.items():
            if name in state:
                state[name] = state[name] * mask.to(state[name].device, state[name].dtype)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.finished and not trainer.fast_dev_run:
            rank_zero_warn(
                f"pruning stopped at {self.unit} {self.last_point} before its last step ({self.end}):"
                f" the model has not reached sparsity {self.amount}"
            )
        if trainer.is_global_zero:
            print_table("Unstructured pruning: network before and after", self.before, stats(pl_module))

    # -- checkpoint state -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": dict(self.masks),
            "last_point": self.last_point,
            "history": list(self.history),
            "before": self.before,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict.get("masks", {}))
        self.last_point = int(state_dict.get("last_point", -1))
        self.history = list(state_dict.get("history", []))
        self.before = state_dict.get("before", self.before)
