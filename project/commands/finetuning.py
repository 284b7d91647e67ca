"""How ``compress`` fine-tunes its variants: the LR schedule made for fine-tuning and the optional teacher.

Both are arguments added to each fine-tuning run's command line after the model's config, so they land in the
run's saved ``config.yaml`` like any other setting.
"""

from __future__ import annotations

import argparse
from typing import Any

SCHEDULES = ("scaled", "cosine", "constant", "config")
_SCHEDULE_ARGS = ("--model.init_args.optimizer", "--model.init_args.lr_scheduler")


def finetune_schedule(config: Any, args: argparse.Namespace, extra: list[str]) -> tuple[list[str], str]:
    """The arguments that give the fine-tuning runs a fine-tuning schedule, and a line saying which.

    The config's schedule was made to train from scratch (a peak LR for random weights); a network that starts
    trained needs a fraction of that LR: the config's own schedule at that fraction (``scaled``: a one-cycle
    warm-up keeps the first QAT steps gentle), a cosine without warm-up, or a flat LR.
    """
    if args.finetune_schedule == "config" or any(a.startswith(_SCHEDULE_ARGS) for a in extra):
        return [], "the config's own LR schedule"
    model = config.model.init_args
    optimizer_args = getattr(getattr(model, "optimizer", None), "init_args", None)
    scheduler_args = getattr(getattr(model, "lr_scheduler", None), "init_args", None)
    peak = getattr(scheduler_args, "max_lr", None) or getattr(optimizer_args, "lr", None)
    if not isinstance(peak, (int, float)):
        return [], "the config's own LR schedule (no single peak LR in it to scale)"
    lr = float(peak) * args.finetune_lr_scale
    if args.finetune_schedule == "scaled":
        scaled = [f"--model.init_args.{key}={float(value) * args.finetune_lr_scale:g}"
                  for key, value in (("optimizer.init_args.lr", getattr(optimizer_args, "lr", None)),
                                     ("lr_scheduler.init_args.max_lr", getattr(scheduler_args, "max_lr", None)))
                  if isinstance(value, (int, float))]
        name = str(getattr(model.lr_scheduler, "class_path", "constant")).rsplit(".", 1)[-1] \
            if getattr(model, "lr_scheduler", None) else "constant"
        return scaled, f"the config's {name} schedule at {args.finetune_lr_scale:g} x its LR (peak {lr:g})"
    scheduler = ('{"class_path": "project.tasks.WarmupCosineLR", "init_args": {"warmup_steps": 0}}'
                 if args.finetune_schedule == "cosine" else "null")
    return ([f"--model.init_args.optimizer.init_args.lr={lr:g}", f"--model.init_args.lr_scheduler={scheduler}"],
            f"{args.finetune_schedule} LR from {lr:g} ({args.finetune_lr_scale:g} x the config's peak {float(peak):g})")


def distillation(config: Any, args: argparse.Namespace) -> list[str]:
    """The arguments that make each fine-tuning run learn from the fp32 checkpoint as its teacher (``--distill``).

    A config whose task already distils (its own teacher) keeps it.
    """
    from project.tasks.distill import DistillationClassifier

    class_path = str(getattr(config.model, "class_path", ""))
    if not args.distill or class_path.endswith(DistillationClassifier.__name__):
        return []
    return [f"--model.class_path={DistillationClassifier.__module__}.{DistillationClassifier.__name__}",
            f"--model.init_args.teacher_checkpoint={args.ckpt}"]
