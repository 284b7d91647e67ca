"""Split-MNIST: does fine-tuning from digits 0-4 beat training from scratch on digits 5-9 with few labels?

1. Pretrain LeNet-5 on digits 0-4 (all their training images), as configs/finetune/mnist_split_pretrain.yaml.
2. For each seed, draw ``--labels-per-class`` training images of each digit 5-9 and train two models with the
   same budget (epochs, batch size, optimizer, LR): one from the pretrained checkpoint as
   configs/finetune/mnist_split_finetune.yaml does (``init_from`` with a fresh head; conv layers frozen
   for the whole run, fully connected layers and head trained), one from scratch (random init, everything trains).
   No validation split (every label trains) and no early stopping: both run the full budget.
3. Both are scored on the full MNIST test set of digits 5-9.

    python scripts/bench_finetune.py [--data-dir ../shared/data] [--seeds 0 1 2]

Prints per-seed accuracies, then one JSON line.
"""

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from functools import partial  # noqa: E402
from lightning import Trainer, seed_everything  # noqa: E402

from project.callbacks.freezing import FreezeSchedule  # noqa: E402
from project.data import MNISTDataModule  # noqa: E402
from project.tasks import ImageClassifier  # noqa: E402

OLD, NEW = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def _trainer(epochs: int, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )


def _test_acc(trainer: Trainer, model: ImageClassifier, data: MNISTDataModule) -> float:
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])


def pretrain(data_dir: str, epochs: int, out: Path) -> tuple[Path, float]:
    seed_everything(0, verbose=False)
    data = MNISTDataModule(
        data_dir=data_dir, download=False, classes=OLD, batch_size=128, val_size=3000, rotate_degrees=10.0, translate=0.1
    )
    model = ImageClassifier(num_classes=5, arch="lenet5", optimizer=partial(torch.optim.AdamW, lr=2e-3, weight_decay=1e-4))
    trainer = _trainer(epochs)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(out, weights_only=True)
    return out, _test_acc(trainer, model, data)


def finetune(data_dir: str, init_from: str | None, seed: int, labels: int, epochs: int, batch_size: int) -> float:
    seed_everything(seed, verbose=False)
    data = MNISTDataModule(
        data_dir=data_dir, download=False, classes=NEW, samples_per_class=labels, val_size=0, batch_size=batch_size, seed=seed,
        eval_batch_size=1000,
    )
    model = ImageClassifier(
        num_classes=5, arch="lenet5", init_from=init_from, reset_head=True,
        optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=1e-4),
    )
    callbacks = [FreezeSchedule(frozen=["net.backbone.features"])] if init_from else []
    trainer = _trainer(epochs, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    return _test_acc(trainer, model, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO / ".." / "shared" / "data"), help="holds MNIST/raw/")
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs (both runs)")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="label draws")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, pre_acc = pretrain(args.data_dir, args.pretrain_epochs, Path(tmp) / "pretrain.ckpt")
        print(f"pretrained LeNet-5 on digits 0-4: test acc {pre_acc:.4f} ({time.time() - start:.0f} s)")
        scratch, tuned = [], []
        for seed in args.seeds:
            s = finetune(args.data_dir, None, seed, args.labels_per_class, args.epochs, args.batch_size)
            f = finetune(args.data_dir, str(ckpt), seed, args.labels_per_class, args.epochs, args.batch_size)
            scratch.append(s)
            tuned.append(f)
            print(f"seed {seed}: digits 5-9, {args.labels_per_class} labels/class, {args.epochs} epochs: "
                  f"scratch {s:.4f}  fine-tuned {f:.4f}")
    result = {
        "scratch_acc": round(statistics.mean(scratch), 4),
        "finetune_acc": round(statistics.mean(tuned), 4),
        "gain_points": round(100 * (statistics.mean(tuned) - statistics.mean(scratch)), 2),
        "labels_per_class": args.labels_per_class,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "scratch_accs": [round(a, 4) for a in scratch],
        "finetune_accs": [round(a, 4) for a in tuned],
        "pretrain_acc_digits_0_4": round(pre_acc, 4),
        "pretrain_epochs": args.pretrain_epochs,
        "threads": args.threads,
        "seconds": round(time.time() - start, 1),
    }
    print(f"mean over {len(args.seeds)} seeds: scratch {result['scratch_acc']:.4f}, fine-tuned {result['finetune_acc']:.4f} "
          f"({result['gain_points']:+.1f} points)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
