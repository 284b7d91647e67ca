"""Optimizer helpers of the task: the default optimizer, per-group LR factors, the schedule's class."""

import inspect
from typing import Any

import torch


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # per-group LR values that optimizers and torch schedules keep


def apply_lr_factors(optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Scale the LRs of groups that carry an ``lr_factor``, after the schedule has read the base LR.

    Scaling after the scheduler is built makes every schedule (``LambdaLR``'s ``base_lrs``,
    ``OneCycleLR``'s per-group ``max_lr``...) run at the factor, not only at its first step.
    """
    for i, group in enumerate(optimizer.param_groups):
        factor = group.get("lr_factor", 1.0)
        if factor == 1.0:
            continue
        for key in LR_KEYS:
            if key in group:
                group[key] = group[key] * factor
        for attr in ("base_lrs", "_last_lr"):
            values = getattr(scheduler, attr, None)
            if isinstance(values, list) and i < len(values):
                values[i] = values[i] * factor


def scheduler_class(factory: Any) -> Any:
    """The class an LR-scheduler factory builds (jsonargparse passes a partial holding the class)."""
    if inspect.isclass(factory):
        return factory
    return next((a for a in reversed(getattr(factory, "args", ())) if inspect.isclass(a)), factory)
