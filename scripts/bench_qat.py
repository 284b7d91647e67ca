"""fp32 vs int8 (QAT) side by side on this CPU: LeNet-5 on full MNIST, the BatchNorm CNN on CIFAR-10.

For each model: a float fit with the model's full recipe (one-cycle schedule run to its end; channels-last),
then QAT fine-tuning of that float model as a user does it (``init_from`` + ``QuantizationAwareTraining``
with ``start_epoch=0``; a small constant LR; observers and BatchNorm statistics frozen in the last epoch,
torchvision's recipe). Then, on the test split:

- accuracy of the float model and of the int8 model (the exported ``.pt2``, compiled);
- on-disk size of both as lean ``torch.export`` ``.pt2`` files (same format, same stripping);
- throughput at batch 64 and latency at batch 1: fp32 eager (the faster of NCHW and channels-last),
  fp32 ``torch.compile``, int8 compiled.

Usage: python scripts/bench_qat.py [--data-dir ../shared/data] [--mnist-epochs 3] [--cifar-epochs 12]
       [--qat-epochs 2] [--limit-train F] [--cifar-limit-train F] [--threads N] [--only mnist_lenet|cifar10_cnn]
Prints a table per model, then one JSON line keyed by model.
"""

import argparse
import copy
import json
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning import Trainer, seed_everything  # noqa: E402

from project.callbacks.qat import QuantizationAwareTraining  # noqa: E402
from project.compression.export import as_unit_float, load_program, save_program  # noqa: E402
from project.fit_artifacts import write_fit_artifacts  # noqa: E402
from project.compression.measure import file_bytes, measure_latency_ms  # noqa: E402
from project.data import ImageFolderDataModule, MNISTDataModule  # noqa: E402
from project.tasks import ImageClassifier  # noqa: E402


def _trainer(epochs: int, callbacks: list, root: Path, limit_train: float) -> Trainer:
    return Trainer(
        max_epochs=epochs, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_train_batches=limit_train, default_root_dir=root,
    )


def _weight_bytes(pt2: Path) -> int:
    """Bytes of the tensors inside a .pt2 archive (its graph and configs excluded)."""
    with zipfile.ZipFile(pt2) as archive:
        return sum(i.file_size for i in archive.infolist() if "/data/weights/weight_" in i.filename)


def _test_batches(dm) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The test split twice: normalised as the network takes it, and in [0, 1] as a shipped program takes it."""
    dm.setup("test")
    raw = list(dm.test_dataloader())
    return [(dm.transform(b[0], train=False), b[1]) for b in raw], [(as_unit_float(b[0]), b[1]) for b in raw]


@torch.inference_mode()
def _accuracy(fn, batches) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((fn(x).argmax(-1) == y).sum())
        total += y.numel()
    return 100.0 * correct / total


def bench_model(name: str, make_model, make_data, recipe: dict, root: Path, limit_train: float) -> dict:
    """Train ``name`` in float with its full recipe, QAT-fine-tune that float model, measure both."""
    epochs, qat_epochs = recipe["epochs"], recipe["qat_epochs"]
    print(f"\n== {name}: {epochs} float epochs, then {qat_epochs} QAT fine-tuning epochs from the float weights", flush=True)
    t0 = time.time()
    seed_everything(0)
    dm = make_data()
    fp32 = make_model(dm, recipe["optimizer"], recipe["schedule"], channels_last=True)
    _trainer(epochs, [], root / f"{name}_fp32", limit_train).fit(fp32, datamodule=dm)
    t_fp32 = time.time() - t0
    float_weights = root / f"{name}_fp32_state.pt"
    torch.save(fp32.net.state_dict(), float_weights)

    # QAT fine-tuning of the float model, as a user does it: init_from + QuantizationAwareTraining(start_epoch=0)
    seed_everything(0)
    qmodel = make_model(dm, recipe["qat_optimizer"], None, init_from=str(float_weights))
    qat = QuantizationAwareTraining(start_epoch=0, **recipe["qat"])
    qat_trainer = _trainer(qat_epochs, [qat], root / f"{name}_qat", limit_train)
    qat_trainer.fit(qmodel, datamodule=dm)
    t_qat = time.time() - t0 - t_fp32
    int8_path = write_fit_artifacts(qat_trainer, qmodel, ["torch"])["torch"]  # what fit's --export writes

    shape = (dm.in_channels, dm.image_size, dm.image_size)
    fp32_net = fp32.net.eval().to(memory_format=torch.contiguous_format)
    fp32_path = save_program(fp32_net, shape, root / f"{name}_fp32.pt2", dm.mean, dm.std)
    batches, unit_batches = _test_batches(dm)
    int8_eager = load_program(int8_path)
    int8 = load_program(int8_path, compile=True)
    fp32_compiled = torch.compile(fp32_net)

    fp32_acc = _accuracy(fp32_net, batches)
    int8_eager_acc = _accuracy(int8_eager, unit_batches)
    int8_acc = _accuracy(int8, unit_batches)  # the artifact as deployed: compiled int8 kernels
    qat_fakequant_acc = _accuracy(qmodel.net.eval(), batches)

    x64, x1 = torch.randn(64, *shape), torch.randn(1, *shape)
    lat = {}
    fp32_cl = copy.deepcopy(fp32_net).to(memory_format=torch.channels_last)
    cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    runs = (("fp32_eager_nchw", fp32_net, lambda x: x), ("fp32_eager_channels_last", fp32_cl, cl),
            ("fp32_compiled", fp32_compiled, lambda x: x), ("int8_compiled", int8, lambda x: x))
    for label, fn, fmt in runs:
        a64, a1 = fmt(x64), fmt(x1)
        lat[f"{label}_b64_ms"] = measure_latency_ms(lambda: fn(a64), warmup=5, repeats=30)
        lat[f"{label}_b1_ms"] = measure_latency_ms(lambda: fn(a1), warmup=10, repeats=100)
    for b in ("b64", "b1"):  # "fp32 eager" is the faster of the two memory formats: the stronger baseline
        lat[f"fp32_eager_{b}_ms"] = min(lat[f"fp32_eager_nchw_{b}_ms"], lat[f"fp32_eager_channels_last_{b}_ms"])
    size_fp32, size_int8 = file_bytes(fp32_path)[0], file_bytes(int8_path)[0]
    result = {
        "fp32_acc": round(fp32_acc, 2),
        "int8_acc": round(int8_acc, 2),
        "int8_eager_acc": round(int8_eager_acc, 2),
        "qat_fakequant_acc": round(qat_fakequant_acc, 2),
        "acc_drop": round(fp32_acc - int8_acc, 2),
        "fp32_pt2_bytes": size_fp32,
        "int8_pt2_bytes": size_int8,
        "size_ratio": round(size_fp32 / size_int8, 2),
        "weights_size_ratio": round(_weight_bytes(fp32_path) / _weight_bytes(int8_path), 2),
        "speedup_b64": round(lat["fp32_eager_b64_ms"] / lat["int8_compiled_b64_ms"], 2),
        "speedup_b64_vs_compiled_fp32": round(lat["fp32_compiled_b64_ms"] / lat["int8_compiled_b64_ms"], 2),
        "speedup_b1": round(lat["fp32_eager_b1_ms"] / lat["int8_compiled_b1_ms"], 3),
        "speedup_b1_vs_compiled_fp32": round(lat["fp32_compiled_b1_ms"] / lat["int8_compiled_b1_ms"], 3),
        **{k: round(v, 3) for k, v in lat.items()},
        "throughput_b64_img_s": {k[:-7]: round(64000 / v, 1) for k, v in lat.items() if k.endswith("_b64_ms")},
        "fp32_epochs": epochs,
        "qat_epochs": qat_epochs,
        "train_s_fp32": round(t_fp32, 1),
        "train_s_qat": round(t_qat, 1),
    }
    print(f"accuracy %      fp32 {fp32_acc:.2f} | int8 compiled {int8_acc:.2f} | int8 eager {int8_eager_acc:.2f}"
          f" | fake-quant {qat_fakequant_acc:.2f}")
    print(f"size (.pt2)     fp32 {size_fp32} B | int8 {size_int8} B | ratio {result['size_ratio']}x"
          f" (tensors alone: {result['weights_size_ratio']}x; the rest is the serialized graph)")
    for b in ("b64", "b1"):
        print(f"latency {b} ms  fp32 eager {lat[f'fp32_eager_{b}_ms']:.3f} | fp32 compiled "
              f"{lat[f'fp32_compiled_{b}_ms']:.3f} | int8 compiled {lat[f'int8_compiled_{b}_ms']:.3f}")
    print(f"speedup int8 vs fp32 eager: b64 {result['speedup_b64']}x, b1 {result['speedup_b1']}x; "
          f"vs fp32 compiled: b64 {result['speedup_b64_vs_compiled_fp32']}x, b1 {result['speedup_b1_vs_compiled_fp32']}x")
    print(f"train time s    fp32 {t_fp32:.0f} | qat {t_qat:.0f}", flush=True)
    return result


def _classifier(arch: str, arch_kwargs: dict, label_smoothing: float):
    def make(dm, optimizer, schedule, channels_last: bool = False, init_from: str | None = None) -> ImageClassifier:
        return ImageClassifier(
            dm.num_classes, dm.in_channels, dm.image_size, arch=arch, arch_kwargs=arch_kwargs,
            label_smoothing=label_smoothing, optimizer=optimizer, lr_scheduler=schedule,
            channels_last=channels_last, init_from=init_from,
        )
    return make


def _one_cycle(max_lr: float, pct_start: float = 0.3):
    return lambda opt, total_steps: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps,
                                                                        pct_start=pct_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO / ".." / "shared" / "data"))
    parser.add_argument("--mnist-epochs", type=int, default=3, help="float epochs of LeNet-5 (configs/mnist_lenet_fast.yaml's recipe)")
    parser.add_argument("--cifar-epochs", type=int, default=12, help="float epochs of the CNN (configs/cifar10_cnn.yaml's recipe)")
    parser.add_argument("--qat-epochs", type=int, default=2, help="QAT fine-tuning epochs (observers and BN frozen in the last)")
    parser.add_argument("--limit-train", type=float, default=1.0, help="fraction of MNIST train batches per epoch")
    parser.add_argument("--cifar-limit-train", type=float, default=1.0, help="fraction of CIFAR train batches per epoch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", choices=["mnist_lenet", "cifar10_cnn"], default=None)
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    freeze_at = args.qat_epochs - 1 if args.qat_epochs > 1 else None
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only in (None, "mnist_lenet"):
            if not (data_dir / "MNIST" / "raw").is_dir():
                raise SystemExit(f"MNIST not found under {data_dir}/MNIST/raw")
            results["mnist_lenet"] = bench_model(
                "mnist_lenet",
                _classifier("lenet5", {}, 0.0),
                lambda: MNISTDataModule(data_dir=str(data_dir), download=False, batch_size=256),
                {
                    "epochs": args.mnist_epochs,
                    "optimizer": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-4),
                    "schedule": _one_cycle(0.01, pct_start=0.25),
                    "qat_epochs": args.qat_epochs,
                    "qat_optimizer": lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=1e-4),
                    "qat": {"freeze_observers_epoch": freeze_at},
                },
                root, args.limit_train,
            )
        if args.only in (None, "cifar10_cnn"):
            archive = data_dir / "cifar10-jpg.tar.gz"
            if not archive.is_file():
                raise SystemExit(f"CIFAR-10 not found: {archive}")
            t = time.time()
            with tarfile.open(archive) as tar:
                tar.extractall(root / "cifar10", filter="data")
            folder = next(p.parent for p in (root / "cifar10").rglob("train") if (p.parent / "test").is_dir())
            print(f"\nextracted CIFAR-10 in {time.time() - t:.0f} s", flush=True)
            results["cifar10_cnn"] = bench_model(
                "cifar10_cnn",
                _classifier("cnn", {"channels": [32, 64], "hidden": 256, "batch_norm": True, "dropout": 0.2}, 0.1),
                lambda: ImageFolderDataModule(str(folder), image_size=32, channels=3, in_memory=True,
                                              num_workers=2, batch_size=256, val_size=2000,
                                              crop_padding=4, horizontal_flip=True),
                {
                    "epochs": args.cifar_epochs,
                    "optimizer": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
                    "schedule": _one_cycle(0.05),
                    "qat_epochs": args.qat_epochs,
                    "qat_optimizer": lambda p: torch.optim.SGD(p, lr=5e-4, momentum=0.9, weight_decay=5e-4),
                    "qat": {"freeze_observers_epoch": freeze_at, "freeze_bn_epoch": freeze_at},
                },
                root, args.cifar_limit_train,
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
