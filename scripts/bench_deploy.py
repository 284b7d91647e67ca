"""Deployment benchmark: compressed CIFAR-10 models in every runtime, through ``python -m project compress``.

Reads the shared JPEG copy of CIFAR-10 (``cifar10-jpg.tar.gz`` in ``--data-dir``, extracted once into
``data/cifar10-jpg/``, decoded into memory by ``ImageFolderDataModule``). Then, each step a command a user runs:

1. the BN CNN: ``fit`` with ``configs/cifar10_cnn.yaml``'s recipe for ``--cnn-epochs`` epochs, then ``compress``
   with variants ``fp32,ptq,int8,pruned_int8`` (QAT fine-tuned ``--finetune-epochs`` with compress's default
   fine-tuning schedule: the config's one-cycle at a tenth of its LR);
2. ResNet-18/32px: a short ``fit`` with ``configs/cifar10_resnet18.yaml``'s recipe (``--resnet-batches`` steps at
   peak LR ``--resnet-lr``: agreement is the point, not accuracy), then ``compress`` with ``fp32,ptq``. The fit
   must learn something: a network that has barely started has near-tied logits, whose order any int8
   rounding flips (docs/benchmarks.md).

``compress`` ships each variant in torch eager, torch.compile, ONNX Runtime and OpenVINO, loads every file back
and measures it on the 10,000 test images (accuracy, agreement with the fp32 PyTorch model) and at batch 1 and
64 (every file timed in turns; compilation excluded). ``--isa AVX2`` runs ``compress`` with
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's int8 kernels as on a CPU without VNNI). Last line: one JSON object with
``machine`` and, per model, ``fp32_acc``, ``variants: {name: {runtime: {acc, agreement, ms_b1, ms_b64}}}``,
``best_fp32_ms_b64``, ``best_int8_ms_b64``, ``speedup_b64``, ``speedup_vs_torch_eager_b64``,
``speedup_vs_torch_eager_b1`` and, for the CNN, ``compressed_speedup_b64``.

    python scripts/bench_deploy.py --data-dir ../shared/data
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_cifar_fast import extracted_folder  # noqa: E402

from project.compression.cpu import describe_cpu  # noqa: E402

INT8 = ("ptq", "int8")


def _config(base: str, folder: Path, work: Path, name: str) -> Path:
    """``configs/<base>`` with its data read from the extracted JPEG folders, in memory."""
    config = yaml.safe_load((REPO / "configs" / base).read_text())
    config["data"] = {"class_path": "project.data.ImageFolderDataModule",
                      "init_args": {"data_dir": str(folder), "in_memory": True, "image_size": 32, "channels": 3,
                                    "batch_size": config["data"]["init_args"].get("batch_size", 256),
                                    "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616],
                                    "crop_padding": 4, "horizontal_flip": True}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _project(args: list[str], env: dict | None = None) -> None:
    print("$ python -m project " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "project", *args], check=True, cwd=REPO, env=env)


def _fit(config: Path, work: Path, name: str, extra: list[str], reuse: Path | None = None) -> Path:
    """The checkpoint of a fit of ``config``: a new fit, or the one an earlier run of this script made in ``reuse``."""
    if reuse is not None:
        found = sorted((reuse / name).glob("version_*/checkpoints/last.ckpt"))
        if not found:
            raise SystemExit(f"--reuse-fits {reuse}: no {name}/version_*/checkpoints/last.ckpt in it")
        return found[-1]
    _project(["fit", f"--config={config}", f"--trainer.logger.init_args.save_dir={work}",
              f"--trainer.logger.init_args.name={name}", "--test_after_fit=false",
              "--trainer.enable_progress_bar=false", *extra])
    return sorted((work / name).glob("version_*/checkpoints/last.ckpt"))[-1]


def _compress(config: Path, ckpt: Path, work: Path, variants: str, args: argparse.Namespace, extra: list[str]) -> dict:
    env = dict(os.environ, **({"ONEDNN_MAX_CPU_ISA": args.isa} if args.isa else {}))
    before = set((work / "compress").glob("version_*"))
    _project(["compress", f"--config={config}", f"--ckpt={ckpt}", f"--variants={variants}", f"--out={work}",
              f"--finetune-epochs={args.finetune_epochs}", f"--runtimes={args.runtimes}", "--batch-sizes=1,64",
              f"--warmup={args.warmup}", f"--repeats={args.repeats}", "--allow-drift", "--trainer.enable_progress_bar=false",
              *extra], env)
    (folder,) = set((work / "compress").glob("version_*")) - before
    return json.loads((folder / "report.json").read_text())


def summarize(report: dict) -> dict:
    """The benchmark's figures of one model from its compress report."""
    rows = report["variants"]
    variants = {name: {rt: {"acc": r["accuracy"], "agreement": r["agreement"], "ms_b1": r["latency_ms_b1"],
                            "ms_b64": r["latency_ms_b64"]} for rt, r in runtimes.items()}
                for name, runtimes in rows.items()}
    fp32 = variants["fp32"]
    best_fp32 = min(r["ms_b64"] for r in fp32.values())
    int8 = [r for name in INT8 if name in variants for r in variants[name].values()]
    out = {"fp32_acc": fp32["torch"]["acc"] if "torch" in fp32 else next(iter(fp32.values()))["acc"],
           "variants": variants, "drift": report["drift"], "best_fp32_ms_b64": best_fp32}
    if int8:
        best_int8_b64 = min(r["ms_b64"] for r in int8)
        out["best_int8_ms_b64"] = best_int8_b64
        out["speedup_b64"] = best_fp32 / best_int8_b64
        if "torch" in fp32:
            out["speedup_vs_torch_eager_b64"] = fp32["torch"]["ms_b64"] / best_int8_b64
            out["speedup_vs_torch_eager_b1"] = fp32["torch"]["ms_b1"] / min(r["ms_b1"] for r in int8)
    if "pruned_int8" in variants:
        out["compressed_speedup_b64"] = best_fp32 / min(r["ms_b64"] for r in variants["pruned_int8"].values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder with cifar10-jpg.tar.gz")
    parser.add_argument("--extract-dir", default=str(REPO / "data" / "cifar10-jpg"))
    parser.add_argument("--work-dir", default=str(REPO / "lightning_logs" / "bench_deploy"))
    parser.add_argument("--cnn-epochs", type=int, default=5, help="float epochs of the BN CNN")
    parser.add_argument("--resnet-batches", type=int, default=100, help="training steps of ResNet-18")
    parser.add_argument("--resnet-lr", type=float, default=0.05,
                        help="peak SGD LR of that short fit (the config's 0.1 leaves near-tied logits after 100 steps)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="QAT fine-tuning epochs of int8/pruned_int8")
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help="peak LR of the fine-tuning runs with the config's one-cycle schedule (default: compress's "
                             "own fine-tuning schedule, the config's at 0.1 x its LR)")
    parser.add_argument("--runtimes", default="torch,torch.compile,onnxruntime,openvino")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--isa", default=None, help="ONEDNN_MAX_CPU_ISA for compress (e.g. AVX2)")
    parser.add_argument("--only", choices=("cnn", "resnet18"), default=None)
    parser.add_argument("--reuse-fits", default=None,
                        help="work folder of an earlier run (e.g. lightning_logs/bench_deploy/<time>): compress its "
                             "checkpoints again instead of fitting (e.g. once more with --isa AVX2)")
    args = parser.parse_args()

    start = time.perf_counter()
    folder = extracted_folder(Path(args.data_dir), Path(args.extract_dir))
    work = Path(args.work_dir) / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    finetune = [f"--model.init_args.optimizer.init_args.lr={args.finetune_lr}",
                f"--model.init_args.lr_scheduler.init_args.max_lr={args.finetune_lr}"] if args.finetune_lr else []
    reuse = Path(args.reuse_fits) if args.reuse_fits else None
    result = {"machine": describe_cpu(), "isa_cap": args.isa, "fits_from": str(reuse or work), "models": {}}
    if args.only in (None, "cnn"):
        config = _config("cifar10_cnn.yaml", folder, work, "cnn")
        ckpt = _fit(config, work, "cnn", [f"--trainer.max_epochs={args.cnn_epochs}"], reuse)
        result["models"]["cifar10_cnn"] = summarize(
            _compress(config, ckpt, work, "fp32,ptq,int8,pruned_int8", args, finetune))
    if args.only in (None, "resnet18"):
        config = _config("cifar10_resnet18.yaml", folder, work, "resnet18")
        ckpt = _fit(config, work, "resnet18", ["--trainer.max_epochs=1",
                                                f"--trainer.limit_train_batches={args.resnet_batches}",
                                                "--model.init_args.lr_scheduler.init_args.warmup_steps=20",
                                                f"--model.init_args.optimizer.init_args.lr={args.resnet_lr}"], reuse)
        result["models"]["resnet18"] = summarize(_compress(config, ckpt, work, "fp32,ptq", args, []))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
