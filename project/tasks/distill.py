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

from project.checkpoints import load_checkpoint
from project.errors import UserError
from project.models import Classifier, build_network
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
    """The network of a checkpoint written by this project's ``fit`` and its hyper-parameters.

    The architecture comes from the checkpoint's ``hyper_parameters`` (``arch``, ``arch_kwargs``,
    ``num_classes``, ``in_channels``, ``image_size``), the weights from its ``net.*`` entries.
    Every problem is a one-line :class:`UserError`.
    """
    checkpoint = load_checkpoint(path)  # weights_only=True; missing or unreadable -> UserError
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(state, dict) or not {"arch", "num_classes"} <= set(hparams):
        raise UserError(
            f"teacher checkpoint {path} has no hyper_parameters with 'arch' and 'num_classes' or no state_dict: "
            "use a checkpoint written by `python -m project fit`"
        )
    hparams = dict(hparams)
    hparams.setdefault("in_channels", 1)
    hparams.setdefault("image_size", 28)
    hparams["arch_kwargs"] = dict(hparams.get("arch_kwargs") or {})
    try:
        net = build_network(
            hparams["arch"], hparams["num_classes"], hparams["in_channels"], hparams["image_size"], **hparams["arch_kwargs"]
        )
    except (ValueError, TypeError) as err:
        raise UserError(f"teacher checkpoint {path}: cannot build its network ({err})") from None
    weights = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(
            f"teacher checkpoint {path}: its weights do not fit its architecture {hparams['arch']!r} ({first}); "
            "use the fp32 checkpoint of a plain, unpruned and unquantized run"
        ) from None
    return net, hparams


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
