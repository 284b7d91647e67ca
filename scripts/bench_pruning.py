"""Pruning benchmark on full MNIST with LeNet-5: dense vs unstructured global pruning vs channel pruning.

One run, side by side, on this CPU:

1. a dense LeNet-5 is trained (``--dense-epochs``);
2. a copy is pruned with ``MagnitudePruning`` (global L1, cubic schedule to ``--sparsity`` over
   ``--prune-epochs`` (pruned at the start of epochs 1..P), then ``--finetune-epochs`` at full sparsity);
3. another copy is pruned with ``ChannelPruning`` (``--channel-amount`` of every layer's output
   channels removed, L2 norm) and fine-tuned for ``--finetune-epochs + --prune-epochs``.

Accuracies are on the 10,000 MNIST test images. MACs are counted for one image; latency is the
median wall time of a batch-64 forward pass in eval mode, with ``--threads`` CPU threads, dense and
pruned measured in alternation. The last line printed is one JSON object.

    python scripts/bench_pruning.py --data-dir ../shared/data
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402

from project.callbacks.magnitude_pruning import MagnitudePruning  # noqa: E402
from project.callbacks.channel_pruning import ChannelPruning  # noqa: E402
from project.compression import measure  # noqa: E402
from project.data import MNISTDataModule  # noqa: E402
from project.tasks import ImageClassifier, WarmupCosineLR  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder holding MNIST/raw/")
    p.add_argument("--dense-epochs", type=int, default=8)
    p.add_argument("--prune-epochs", type=int, default=4, help="epochs over which the cubic schedule runs")
    p.add_argument("--finetune-epochs", type=int, default=4, help="epochs at full sparsity after the schedule")
    p.add_argument("--sparsity", type=float, default=0.93, help="final unstructured sparsity")
    p.add_argument("--channel-amount", type=float, default=0.5, help="fraction of channels removed per layer")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for training and latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-batches", type=float, default=1.0, help="fraction of batches per epoch (smoke runs)")
    return p.parse_args()


def optimizer_factory(lr: float):
    def make(params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)

    return make


def schedule_factory(warmup: int):
    def make(optimizer, total_steps=None):
        return WarmupCosineLR(optimizer, total_steps=total_steps, warmup_steps=warmup, min_lr_factor=0.02)

    return make


def train(model: ImageClassifier, dm: MNISTDataModule, epochs: int, callbacks: list, root: Path, args) -> float:
    """Fit, then return test accuracy of the final weights (no checkpoint selection)."""
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=callbacks,
        default_root_dir=root,
        logger=L.pytorch.loggers.CSVLogger(root, name="bench"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches,
        limit_test_batches=1.0,
        num_sanity_val_steps=0,
    )
    start = time.time()
    trainer.fit(model, dm)
    acc = float(trainer.test(model, dm, verbose=False)[0]["test/acc"])
    print(f"  {epochs} epochs in {time.time() - start:.0f}s, test accuracy {acc:.4f}", flush=True)
    return acc


def latency_pair(dense: torch.nn.Module, pruned: torch.nn.Module, batch: int, rounds: int = 5) -> tuple[float, float]:
    """Median-of-medians ms per forward pass for each model, measured in alternation."""
    x = torch.randn(batch, 1, 28, 28)
    dense, pruned = dense.eval(), pruned.eval()
    d, p = [], []
    for _ in range(rounds):
        d.append(measure.measure_latency_ms(lambda: dense(x), warmup=10, repeats=40))
        p.append(measure.measure_latency_ms(lambda: pruned(x), warmup=10, repeats=40))
    return sorted(d)[rounds // 2], sorted(p)[rounds // 2]


def weight_sparsity(net: torch.nn.Module) -> float:
    ws = [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        raise SystemExit(f"error: no MNIST/raw/ under {args.data_dir}: pass --data-dir")
    L.seed_everything(args.seed, verbose=False)
    root = Path(tempfile.mkdtemp(prefix="bench_pruning_"))
    dm = MNISTDataModule(args.data_dir, download=False, batch_size=args.batch_size, seed=args.seed)
    steps_per_epoch = 55000 // args.batch_size

    def new_model(lr: float, warmup: int) -> ImageClassifier:
        return ImageClassifier(10, 1, 28, arch="lenet5", optimizer=optimizer_factory(lr),
                               lr_scheduler=schedule_factory(warmup))

    print(f"dense LeNet-5, {args.dense_epochs} epochs", flush=True)
    dense = new_model(args.lr, steps_per_epoch // 2)
    dense_acc = train(dense, dm, args.dense_epochs, [], root, args)
    dense_state = copy.deepcopy(dense.state_dict())

    total = args.prune_epochs + args.finetune_epochs
    print(f"unstructured: global L1 to {args.sparsity:.0%} at the start of epochs 1..{args.prune_epochs},"
          f" fine-tuned at full sparsity to epoch {total - 1}", flush=True)
    unstructured = new_model(args.finetune_lr, 0)
    unstructured.load_state_dict(dense_state)
    # The cubic schedule starts at s_i = 0 (epoch 0 trains the copy unchanged) and reaches the target at epoch P.
    pruner = MagnitudePruning(amount=args.sparsity, start=0, end=args.prune_epochs, unit="epoch")
    unstructured_acc = train(unstructured, dm, total, [pruner], root, args)

    print(f"structured: {args.channel_amount:.0%} of each layer's channels removed, fine-tuned {total} epochs",
          flush=True)
    structured = new_model(args.finetune_lr, 0)
    structured.load_state_dict(dense_state)
    structured_acc = train(structured, dm, total, [ChannelPruning(amount=args.channel_amount, norm=2)], root, args)

    one = torch.randn(1, 1, 28, 28)
    rows = {
        "dense": measure.model_stats(dense.net, one),
        "unstructured": measure.model_stats(unstructured.net, one),
        "structured": measure.model_stats(structured.net, one),
    }
    print("\n" + measure.format_table(rows, measure.STATS_KEYS))
    d64, s64 = latency_pair(dense.net, structured.net, 64)
    d1, s1 = latency_pair(dense.net, structured.net, 1)
    print(f"\nlatency ({args.threads} thread(s)), ms per forward: batch 64 dense {d64:.3f} / structured {s64:.3f}"
          f" ({d64 / s64:.2f}x); batch 1 dense {d1:.3f} / structured {s1:.3f} ({d1 / s1:.2f}x)")
    u_sparsity = weight_sparsity(unstructured.net)
    print(f"accuracy: dense {dense_acc:.4f}, unstructured {unstructured_acc:.4f} ({u_sparsity:.2%} of conv/linear"
          f" weights zero, {rows['dense']['nonzero'] / rows['unstructured']['nonzero']:.1f}x fewer non-zeros),"
          f" structured {structured_acc:.4f}")
    result = {
        "dense_acc": round(dense_acc, 4),
        "unstructured_acc": round(unstructured_acc, 4),
        "unstructured_sparsity": round(u_sparsity, 4),
        "unstructured_nonzero_ratio": round(rows["dense"]["nonzero"] / rows["unstructured"]["nonzero"], 2),
        "structured_acc": round(structured_acc, 4),
        "structured_mac_ratio": round(rows["dense"]["macs"] / rows["structured"]["macs"], 2),
        "structured_param_ratio": round(rows["dense"]["params"] / rows["structured"]["params"], 2),
        "structured_speedup": round(d64 / s64, 2),
        "structured_speedup_b1": round(d1 / s1, 2),
        "latency_ms_b64": {"dense": round(d64, 3), "structured": round(s64, 3)},
        "threads": args.threads,
        "epochs": {"dense": args.dense_epochs, "prune": args.prune_epochs, "finetune": args.finetune_epochs},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
