"""MNIST benchmark: the seed documents' plain loop vs the project's Trainer, on the same machine.

(a) seed loop: plain PyTorch, LeNet-5, DataLoader + ToTensor, batch 32, Adam lr 1e-3, 5 epochs;
(b) the race: ``configs/mnist_lenet_fast.yaml`` through the project's CLI/Trainer (fit time);
(c) the full recipe: ``configs/mnist_lenet.yaml``;
(d) Lightning's overhead: the fast recipe's model and data path in a raw loop vs the Trainer.
(a) and (b) alternate, ``--repeats`` times each, then (d)'s two runs, ``--overhead-repeats`` times; medians are
reported. Each run is a fresh Python process, so no run inherits another's allocator state, imports or threads;
(a)'s process never imports Lightning (whose import makes every torch optimizer step probe for a GPU driver).
Last line: one JSON object.

    python scripts/bench_mnist.py --data-dir ../shared/data
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from project.models import build_network  # noqa: E402  (Lightning is imported only by the runs that use it)


def seed_loop(data_dir: str, epochs: int = 5) -> tuple[float, float]:
    """(a): the plain PyTorch loop of the seed documents. Returns (fit seconds, test accuracy)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    tf = transforms.ToTensor()
    train = DataLoader(datasets.MNIST(data_dir, train=True, transform=tf), batch_size=32, shuffle=True)
    test = DataLoader(datasets.MNIST(data_dir, train=False, transform=tf), batch_size=1000)
    model = build_network("lenet5", 10, 1, 28)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    fit_s = time.perf_counter() - start
    return fit_s, _accuracy(model, test)


@torch.inference_mode()
def _accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


def project_run(config: str, data_dir: str, workdir: Path, *extra: str, test: bool = True) -> tuple[float, float | None]:
    """Fit ``config`` through the project's CLI objects; returns (fit seconds, test accuracy or None)."""
    from project.cli import ProjectCLI

    cli = ProjectCLI(
        args=[f"--config={REPO / config}", f"--data.data_dir={data_dir}", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={workdir}", *extra],
        run=False,
    )
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - start
    if not test:
        return fit_s, None
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return fit_s, float(result[0]["test/acc"])


def raw_loop(config: str, data_dir: str) -> float:
    """(d): the same model, optimizer, schedule and in-memory data path as ``config``, without the Trainer.

    Timed like ``trainer.fit`` in :func:`project_run`: loading the data and building the optimizer included.
    """
    from project.cli import ProjectCLI

    cli = ProjectCLI(args=[f"--config={REPO / config}", f"--data.data_dir={data_dir}"], run=False)
    dm, model = cli.datamodule, cli.model
    epochs = cli.trainer.max_epochs
    start = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    optimizer = model.optimizer(model.parameter_groups())
    schedule = model.lr_scheduler(optimizer, total_steps=epochs * len(loader))
    model.train()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            images = dm.transform(images, train=True)
            loss = F.cross_entropy(model(images), labels, label_smoothing=model.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return time.perf_counter() - start


RUNS = {
    "seed": lambda a: seed_loop(a.data_dir),
    "fast": lambda a: project_run("configs/mnist_lenet_fast.yaml", a.data_dir, Path(a.workdir), "--test_after_fit=false"),
    "raw": lambda a: (raw_loop("configs/mnist_lenet_fast.yaml", a.data_dir), None),
    "trainer": lambda a: project_run("configs/mnist_lenet_fast.yaml", a.data_dir, Path(a.workdir), "--test_after_fit=false",
                                     "--trainer.limit_val_batches=0", "--checkpoint.monitor=null", test=False),
    "full": lambda a: project_run("configs/mnist_lenet.yaml", a.data_dir, Path(a.workdir), "--test_after_fit=false"),
}


def run_in_subprocess(kind: str, args: argparse.Namespace) -> tuple[float, float | None]:
    """One run of ``kind`` in a fresh interpreter; returns (fit seconds, test accuracy or None)."""
    cmd = [sys.executable, __file__, "--one", kind, "--data-dir", args.data_dir, "--workdir", args.workdir,
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: the {kind} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["fit_s"], result["acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder with MNIST/raw/")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of (a) and (b)")
    parser.add_argument("--overhead-repeats", type=int, default=5, help="alternating runs of (d)'s raw loop and Trainer")
    parser.add_argument("--workdir", default="/tmp/bench_mnist_logs", help="where the runs' logs go")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for every run (0: torch's default)")
    parser.add_argument("--one", choices=sorted(RUNS), help=argparse.SUPPRESS)  # internal: a single run
    args = parser.parse_args()
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        sys.exit(f"error: no MNIST/raw/ under {args.data_dir}: pass --data-dir DIR laid out like ../shared/data")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.one:
        fit_s, acc = RUNS[args.one](args)
        print(json.dumps({"fit_s": fit_s, "acc": acc}))
        return

    seed_s, seed_acc, fast_s, fast_acc = [], [], [], []
    for i in range(args.repeats):
        s, a = run_in_subprocess("seed", args)
        seed_s.append(s), seed_acc.append(a)
        print(f"(a) seed loop run {i}: {s:.1f} s, test acc {a:.4f}", flush=True)
        s, a = run_in_subprocess("fast", args)
        fast_s.append(s), fast_acc.append(a)
        print(f"(b) mnist_lenet_fast run {i}: fit {s:.1f} s, test acc {a:.4f}", flush=True)

    trainer_s, raw_s = [], []
    for i in range(args.overhead_repeats):
        raw_s.append(run_in_subprocess("raw", args)[0])
        trainer_s.append(run_in_subprocess("trainer", args)[0])
        print(f"(d) raw loop {raw_s[-1]:.1f} s vs Trainer {trainer_s[-1]:.1f} s", flush=True)

    full_s, full_acc = run_in_subprocess("full", args)
    print(f"(c) mnist_lenet full recipe: fit {full_s:.1f} s, test acc {full_acc:.4f}", flush=True)

    med = statistics.median
    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "seed_loop_s": round(med(seed_s), 2),
        "seed_loop_acc": round(med(seed_acc), 4),
        "project_fit_s": round(med(fast_s), 2),
        "project_acc": round(med(fast_acc), 4),
        "project_acc_min": round(min(fast_acc), 4),
        "speedup": round(med(seed_s) / med(fast_s), 2),
        "full_recipe_fit_s": round(full_s, 1),
        "full_recipe_acc": round(full_acc, 4),
        "raw_loop_s": round(med(raw_s), 2),
        "trainer_loop_s": round(med(trainer_s), 2),
        "lightning_overhead": round(med(trainer_s) / med(raw_s), 3),
        "lightning_overhead_pairs": [round(t / r, 3) for t, r in zip(trainer_s, raw_s)],
        "repeats": args.repeats,
        "overhead_repeats": args.overhead_repeats,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
