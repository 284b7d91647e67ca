"""``DistillationClassifier``: a student network trained to match a frozen teacher's softened outputs.

The loss is Hinton et al.'s (2015)::

    (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The student is ``self.net``, exactly as in :class:`ImageClassifier`, so callbacks that prune or
quantize ``pl_module.net`` act on the student only. The teacher lives in ``self.teacher``: frozen,
always in eval mode, left out of the optimizer and of every saved ``state_dict``, so a distilled
checkpoint is a plain :class:`ImageClassifier` checkpoint of the student.
"""

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from project.checkpoints import load_network
from project.errors import UserError
from project.models import Classifier
from project.tasks.classifier import ImageClassifier

_TEACHER = "teacher."


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T^2`` keeps the gradient's scale independent of the temperature.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def load_teacher(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """The teacher's network and hyper-parameters (:func:`project.checkpoints.load_network`)."""
    return load_network(path, what="teacher checkpoint")


class DistillationClassifier(ImageClassifier):
    """Knowledge distillation: train the student ``arch`` to match a frozen teacher from a checkpoint.

    Takes every argument of :class:`ImageClassifier` (they describe the student), plus:

    Args:
        teacher_checkpoint: Path of a checkpoint written by ``python -m project fit`` (e.g.
            ``lightning_logs/mnist_lenet/version_0/checkpoints/best.ckpt``). Its hyper-parameters give the
            teacher's architecture; it must predict the same classes as the data.
        temperature: Softmax temperature T (> 0) of both teacher and student in the distillation term;
            higher values expose more of the teacher's "dark knowledge" about wrong classes.
        alpha: Weight in [0, 1] of the distillation term; ``1 - alpha`` weighs the cross-entropy with
            the true labels. 0 trains the student alone.
        **kwargs: Arguments of :class:`ImageClassifier` (``num_classes``, ``arch``, ``optimizer``, ...).
    """

    def __init__(self, teacher_checkpoint: str, temperature: float = 4.0, alpha: float = 0.9, **kwargs: Any) -> None:
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {alpha}")
        super().__init__(**kwargs)
        teacher, teacher_hp = load_teacher(teacher_checkpoint)
        student_hp = self.hparams
        for key in ("num_classes", "in_channels", "image_size"):
            if teacher_hp[key] != student_hp[key]:
                raise UserError(
                    f"teacher checkpoint {teacher_checkpoint} was trained with {key}={teacher_hp[key]} but the data "
                    f"has {key}={student_hp[key]}: distil from a teacher trained on the same data"
                )
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.teacher: nn.Module = teacher.requires_grad_(False).eval()
        self.register_state_dict_post_hook(_drop_teacher_entries)
        self.register_load_state_dict_post_hook(_forgive_missing_teacher)

    def train(self, mode: bool = True) -> "DistillationClassifier":
        """Set the student's mode; the teacher stays in eval mode (BatchNorm statistics, dropout off)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        kd = distillation_loss(logits, teacher_logits, self.temperature)
        loss = (1.0 - self.alpha) * ce + self.alpha * kd
        self.update_train_metrics(logits, labels)
        self.log_train_loss(loss, labels.numel())
        self.log("train/ce_loss", ce, on_step=False, on_epoch=True)
        self.log("train/kd_loss", kd, on_step=False, on_epoch=True)
        return loss  # the training metrics are logged at epoch end by ImageClassifier

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The student's parameter groups; the teacher's parameters are never in them."""
        teacher = {id(p) for p in self.teacher.parameters()}
        groups = super().parameter_groups()
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in teacher]} for g in groups]
        return [g for g in groups if g["params"]]


def _drop_teacher_entries(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _TEACHER)]:
        del state_dict[key]


def _forgive_missing_teacher(module: nn.Module, incompatible_keys: Any) -> None:
    # The teacher comes from teacher_checkpoint, never from the student's checkpoint.
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(_TEACHER)]
