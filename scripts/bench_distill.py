"""Knowledge distillation on MNIST: a small student trained alone vs distilled from LeNet-5, same budget.

1. A LeNet-5 teacher is trained on the full training set for ``--teacher-epochs`` epochs and saved as a
   Lightning checkpoint (the kind ``python -m project fit`` writes).
2. The student (an MLP with ``--hidden`` units) is trained on ``--samples-per-class`` labelled images per
   class, once alone (cross-entropy) and once distilled from the teacher
   (``project.tasks.distill.DistillationClassifier``), with the same seed, epochs, optimizer, schedule
   and data (no augmentation unless ``--augment``; the teacher trains with random rotation and shift).
   Repeated for each of ``--seeds``.
3. Everything is tested on the full 10,000-image test split. Last line: one JSON object.

    python scripts/bench_distill.py --data-dir ../shared/data
"""

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning import Trainer, seed_everything  # noqa: E402

from project.data import MNISTDataModule  # noqa: E402
from project.tasks import ImageClassifier  # noqa: E402
from project.tasks.distill import DistillationClassifier  # noqa: E402


def _trainer(epochs: int) -> Trainer:
    return Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )


def _data(args: argparse.Namespace, samples_per_class: int | None, seed: int, augment: bool = False) -> MNISTDataModule:
    shift = {"rotate_degrees": 10.0, "translate": 0.1} if augment else {}
    return MNISTDataModule(
        data_dir=args.data_dir, download=False, samples_per_class=samples_per_class, val_size=0,
        batch_size=args.batch_size, eval_batch_size=1000, seed=seed, **shift,
    )


def _test_acc(trainer: Trainer, model: ImageClassifier, data: MNISTDataModule) -> float:
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])


def _optimizer(lr: float):
    return partial(torch.optim.AdamW, lr=lr, weight_decay=1e-4)


def _schedule(max_lr: float):
    return partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=max_lr, pct_start=0.2)


def train_teacher(args: argparse.Namespace, path: Path) -> float:
    seed_everything(0, verbose=False)
    data = _data(args, None, seed=0, augment=True)
    model = ImageClassifier(10, arch="lenet5", optimizer=_optimizer(4e-3), lr_scheduler=_schedule(4e-3))
    trainer = _trainer(args.teacher_epochs)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(path)
    return _test_acc(trainer, model, data)


def test_teacher(args: argparse.Namespace, path: Path) -> float:
    from project.tasks.distill import load_teacher

    net, hparams = load_teacher(path)
    model = ImageClassifier(hparams["num_classes"], arch=hparams["arch"], arch_kwargs=hparams["arch_kwargs"])
    model.net = net
    return _test_acc(_trainer(1), model, _data(args, None, seed=0))


def train_student(args: argparse.Namespace, seed: int, teacher: Path | None) -> float:
    seed_everything(seed, verbose=False)
    data = _data(args, args.samples_per_class, seed=seed, augment=args.augment)
    common = dict(
        num_classes=10, arch="mlp", arch_kwargs={"hidden": args.hidden},
        optimizer=_optimizer(args.lr), lr_scheduler=_schedule(args.lr),
    )
    if teacher is None:
        model = ImageClassifier(**common)
    else:
        model = DistillationClassifier(
            teacher_checkpoint=str(teacher), temperature=args.temperature, alpha=args.alpha, **common
        )
    trainer = _trainer(args.student_epochs)
    trainer.fit(model, datamodule=data)
    return _test_acc(trainer, model, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder holding MNIST/raw/")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--student-epochs", type=int, default=30)
    parser.add_argument("--samples-per-class", type=int, default=100, help="labelled training images per class for the student")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128], help="the student MLP's hidden widths")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", action="store_true", help="random rotation and shift of the student's images")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-checkpoint", help="use this teacher checkpoint instead of training one")
    args = parser.parse_args()
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        raise SystemExit(f"error: no MNIST/raw/ under {args.data_dir}: pass --data-dir")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # only this script's figures on the console

    start, cpu_start = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        if args.teacher_checkpoint:
            teacher = Path(args.teacher_checkpoint)
            teacher_acc = test_teacher(args, teacher)
            print(f"teacher  {teacher}: test acc {teacher_acc:.4f}", flush=True)
        else:
            teacher = Path(tmp) / "teacher.ckpt"
            teacher_acc = train_teacher(args, teacher)
            print(f"teacher  LeNet-5, {args.teacher_epochs} epochs, full train set: test acc {teacher_acc:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        alone, distilled = [], []
        for seed in args.seeds:
            t0 = time.perf_counter()
            alone.append(train_student(args, seed, None))
            t1 = time.perf_counter()
            distilled.append(train_student(args, seed, teacher))
            print(f"seed {seed}: student alone {alone[-1]:.4f} ({t1 - t0:.0f} s)  "
                  f"distilled {distilled[-1]:.4f} ({time.perf_counter() - t1:.0f} s)", flush=True)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    mean_alone, mean_distilled = statistics.mean(alone), statistics.mean(distilled)
    wins = sum(d > a for a, d in zip(alone, distilled))
    print(f"\nstudent MLP {args.hidden}, {args.samples_per_class} images/class, {args.student_epochs} epochs, "
          f"T={args.temperature}, alpha={args.alpha}, seeds {args.seeds}")
    print(f"  alone      mean test acc {mean_alone:.4f}")
    print(f"  distilled  mean test acc {mean_distilled:.4f}  ({mean_distilled - mean_alone:+.4f}; "
          f"better on {wins}/{len(args.seeds)} seeds)")
    print(f"  teacher    test acc      {teacher_acc:.4f}")
    print(f"  total {elapsed:.0f} s wall, {cpu:.0f} s CPU time, {torch.get_num_threads()} threads")
    print(json.dumps({
        "student_alone_acc": round(mean_alone, 4),
        "student_distilled_acc": round(mean_distilled, 4),
        "teacher_acc": round(teacher_acc, 4),
        "student_alone_acc_per_seed": [round(a, 4) for a in alone],
        "student_distilled_acc_per_seed": [round(d, 4) for d in distilled],
        "teacher": str(args.teacher_checkpoint or "lenet5"), "teacher_epochs": None if args.teacher_checkpoint else args.teacher_epochs,
        "student": f"mlp{args.hidden}", "student_epochs": args.student_epochs,
        "samples_per_class": args.samples_per_class, "augment": args.augment, "temperature": args.temperature, "alpha": args.alpha,
        "seeds": args.seeds, "seconds": round(elapsed, 1), "cpu_seconds": round(cpu, 1),
    }))


if __name__ == "__main__":
    main()
