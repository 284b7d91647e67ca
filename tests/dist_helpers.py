"""A test-only callback for DDP runs: each rank writes what it saw to ``<out_dir>/rank<R>.json``.

Put into a run from the command line or a YAML config (``trainer.callbacks``) as
``tests.dist_helpers.RankRecorder`` with ``out_dir``. It records, per rank:

- the identity of every sample in every batch (a hash of the image's uint8 pixels, recovered from the
  normalised batch, so augmentation must be off) per training epoch, per validation and per test;
- per training epoch: the sum of the rank's step losses weighted by batch size, beside the epoch loss
  Lightning hands to callbacks (``train/loss_epoch``, reduced over ranks);
- per validation / test: the rank's own correct-prediction count, sample count and summed loss,
  computed here from the batches it saw, beside the metrics Lightning reports on that rank
  (``val/acc``, ``val/loss``, ...) once the epoch's metrics are reduced;
- a digest of the model's weights at the end of training (equal on every rank iff the ranks agree).
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from torch import Tensor


def image_hash(image: Tensor) -> str:
    """Short hash of one uint8 image's bytes."""
    return hashlib.blake2b(image.contiguous().cpu().numpy().tobytes(), digest_size=8).hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer of ``module``, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RankRecorder(Callback):
    """Write per-rank observations of a run to ``out_dir/rank<global_rank>.json`` (see the module docstring).

    Args:
        out_dir: Folder for the JSON files (created if missing).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {"train": [], "val": [], "test": []}
        self._eval: dict[str, Any] | None = None

    def _to_uint8(self, trainer: Trainer, images: Tensor) -> Tensor:
        dm = trainer.datamodule
        c = images.shape[1]
        mean = torch.tensor(dm.mean, device=images.device).view(1, c, 1, 1) * 255
        std = torch.tensor(dm.std, device=images.device).view(1, c, 1, 1) * 255
        return (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)

    def _hashes(self, trainer: Trainer, batch: Any) -> list[str]:
        return [image_hash(img) for img in self._to_uint8(trainer, batch[0])]

    def _write(self, trainer: Trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = {**self.record, "rank": trainer.global_rank, "world_size": trainer.world_size}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(data))

    # ---- training ------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["train"].append(
            {"epoch": trainer.current_epoch, "hashes": [], "batch_sizes": [], "loss_sum": 0.0}
        )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        epoch = self.record["train"][-1]
        epoch["hashes"] += self._hashes(trainer, batch)
        epoch["batch_sizes"].append(len(batch[1]))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record["train"][-1]["loss_sum"] += float(outputs["loss"]) * len(batch[1])

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["train"][-1]["loss_epoch"] = float(trainer.callback_metrics["train/loss_epoch"])

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["weights_digest"] = weights_digest(pl_module)
        self.record["global_step"] = trainer.global_step
        self._write(trainer)

    # ---- evaluation ----------------------------------------------------------------------------

    def _start(self, trainer: Trainer) -> None:
        self._eval = None if trainer.sanity_checking else {"hashes": [], "correct": 0, "count": 0, "loss_sum": 0.0}

    @torch.no_grad()
    def _batch(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        if self._eval is None:
            return
        images, labels = batch[0], batch[1]
        logits = pl_module(images)
        self._eval["hashes"] += self._hashes(trainer, batch)
        self._eval["correct"] += int((logits.argmax(-1) == labels).sum())
        self._eval["count"] += len(labels)
        self._eval["loss_sum"] += float(F.cross_entropy(logits.float(), labels, reduction="sum"))

    def _end(self, trainer: Trainer, stage: str) -> None:
        if self._eval is None:
            return
        prefix = f"{stage}/"
        self._eval["logged"] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and v.numel() == 1
        }
        self._eval["epoch"] = trainer.current_epoch
        self.record[stage].append(self._eval)
        self._eval = None
        self._write(trainer)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, pl_module, batch)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_validation_end, not ..._epoch_end: only now are this epoch's logged metrics reduced
        self._end(trainer, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, pl_module, batch)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, "test")


class FailRankAtExit(Callback):
    """On rank ``rank``, exit with ``status`` as the interpreter exits, after the run has finished everywhere:
    a rank that fails after rank 0 is done, which rank 0's own exit status must not hide."""

    def __init__(self, rank: int = 1, status: int = 7) -> None:
        self.rank, self.status = rank, status

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank == self.rank:
            import atexit
            import os
            import sys

            def fail() -> None:
                sys.stdout.flush()
                os._exit(self.status)

            atexit.register(fail)
