"""Learning-rate schedules whose length the task fills in from the Trainer.

A schedule that takes ``total_steps`` (this one, or torch's ``OneCycleLR``) and is given
none in the config gets ``trainer.estimated_stepping_batches`` and steps every batch.
"""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up to the base LR, then cosine decay to ``min_lr_factor`` x base LR.

    Args:
        optimizer: The optimizer whose LRs are scheduled.
        total_steps: Length of the schedule in optimizer steps; ``None`` lets the task fill
            in the run's length.
        warmup_steps: Steps of linear warm-up from 0.
        min_lr_factor: Final LR as a fraction of the base LR.
    """

    def __init__(
        self, optimizer: Optimizer, total_steps: int | None = None, warmup_steps: int = 0, min_lr_factor: float = 0.0
    ) -> None:
        if total_steps is None or total_steps <= 0:
            raise ValueError("WarmupCosineLR needs total_steps > 0")
        self.total_steps = total_steps

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_lr_factor + (1 - min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
