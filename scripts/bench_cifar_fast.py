"""CIFAR-10 speed benchmark: ``configs/cifar10_fast.yaml`` through the project's CLI objects.

Reads the shared JPEG copy of CIFAR-10 (``cifar10-jpg.tar.gz`` in ``--data-dir``): extracts it once to
``--extract-dir`` (reused when already there), decodes it into memory with ``ImageFolderDataModule``
and fits the fast recipe. ``--format pickle`` reads torchvision's ``cifar-10-batches-py/`` in
``--data-dir`` with ``CIFAR10DataModule`` instead.

Figures: ``fit_s`` is the training time, from Lightning's ``on_train_start`` to ``on_train_end``
(CUDA synchronised at both ends): decoding the images and moving them to the device happen before it
and are excluded, as the anchors (airbench, FFCV, Page) exclude data loading; any ``torch.compile``
compilation during training is included. ``fit_wall_s`` is the whole ``trainer.fit`` call.
``test_acc`` is the final model's accuracy on the 10,000 test images. Last line: one JSON object.

    python scripts/bench_cifar_fast.py --data-dir ../shared/data                 # the full recipe
    python scripts/bench_cifar_fast.py --max-epochs 1 --limit-train-batches 20   # a quick check on a CPU
"""

import argparse
import json
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from project.cli import ProjectCLI  # noqa: E402

CONFIG = REPO / "configs" / "cifar10_fast.yaml"


class TrainTimer(Callback):
    """Seconds from ``on_train_start`` to ``on_train_end``, with the device synchronised at both ends."""

    def __init__(self) -> None:
        self.start = self.seconds = 0.0

    @staticmethod
    def _sync(trainer: Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(trainer)
        self.start = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(trainer)
        self.seconds = time.perf_counter() - self.start


def extracted_folder(data_dir: Path, extract_dir: Path) -> Path:
    """The JPEG folders (``train/``, ``test/``) from ``data_dir/cifar10-jpg.tar.gz``, extracted once."""
    if (extract_dir / "train").is_dir() and (extract_dir / "test").is_dir():
        return extract_dir
    archive = data_dir / "cifar10-jpg.tar.gz"
    if not archive.is_file():
        sys.exit(f"error: {archive} not found: pass --data-dir DIR holding cifar10-jpg.tar.gz, or --format pickle")
    extract_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory(dir=extract_dir.parent) as tmp:
        tar.extractall(tmp, filter="data")
        for name in ("train", "test"):
            (Path(tmp) / name).rename(extract_dir / name)  # complete folders only: a crash leaves none behind
    print(f"extracted {archive} to {extract_dir} in {time.perf_counter() - start:.1f} s", flush=True)
    return extract_dir


def data_args(args: argparse.Namespace) -> list[str]:
    if args.format == "pickle":
        return ["--data.data_dir", str(args.data_dir), "--data.download", "false"]
    folder = extracted_folder(Path(args.data_dir), Path(args.extract_dir))
    return ["--data", "project.data.ImageFolderDataModule", "--data.data_dir", str(folder), "--data.in_memory", "true"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder with cifar10-jpg.tar.gz")
    parser.add_argument("--format", choices=["jpg", "pickle"], default="jpg",
                        help="jpg: the shared JPEG archive; pickle: DATA_DIR/cifar-10-batches-py/")
    parser.add_argument("--extract-dir", default=str(REPO / "data" / "cifar10-jpg"),
                        help="where the archive is extracted (reused if already there; data/ is git-ignored)")
    parser.add_argument("--workdir", default="/tmp/bench_cifar_fast_logs", help="where the run's logs go")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the recipe's epochs (quick checks)")
    parser.add_argument("--limit-train-batches", type=float, default=None, help="batches per epoch (quick checks)")
    parser.add_argument("--accelerator", default="auto", help="auto, gpu or cpu")
    parser.add_argument("--precision", default=None, help="override the recipe's precision (CPU: 32-true)")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                        help="torch.compile the network; auto: on a CUDA device only")
    parser.add_argument("extra", nargs="*", help="more CLI overrides, e.g. --model.init_args.compile=true after --")
    args = parser.parse_args()

    timer = TrainTimer()
    cli_args = [
        f"--config={CONFIG}", *data_args(args), f"--trainer.accelerator={args.accelerator}",
        "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={args.workdir}",
        "--checkpoint.save_last=false", "--checkpoint.save_top_k=0", "--lr_monitor.logging_interval=epoch",
    ]
    if args.max_epochs is not None:
        cli_args.append(f"--trainer.max_epochs={args.max_epochs}")
    if args.limit_train_batches is not None:
        value = int(args.limit_train_batches) if args.limit_train_batches >= 1 else args.limit_train_batches
        cli_args.append(f"--trainer.limit_train_batches={value}")
    if args.precision is not None:
        cli_args.append(f"--trainer.precision={args.precision}")
    compile_net = args.compile == "true" or (args.compile == "auto" and args.accelerator != "cpu" and torch.cuda.is_available())
    cli_args.append(f"--model.init_args.compile={str(compile_net).lower()}")
    cli = ProjectCLI(args=[*cli_args, *args.extra], run=False)
    trainer = cli.trainer
    trainer.callbacks.append(timer)
    device = trainer.strategy.root_device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {name}; precision {trainer.precision}; compile {compile_net}; {trainer.max_epochs} epochs", flush=True)

    start = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_wall_s = time.perf_counter() - start
    print(f"fit: {timer.seconds:.2f} s training ({fit_wall_s:.2f} s with data loading and setup)", flush=True)
    result = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    test_acc = float(result[0]["test/acc"])
    print(f"test accuracy: {test_acc:.4f}", flush=True)

    print(json.dumps({
        "fit_s": round(timer.seconds, 2),
        "fit_wall_s": round(fit_wall_s, 2),
        "test_acc": round(test_acc, 4),
        "device": name,
        "precision": str(trainer.precision),
        "compile": compile_net,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "data": args.format,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
