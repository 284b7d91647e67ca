"""``python -m project export``: a trained checkpoint as ONNX and OpenVINO models, fp32 and int8 (post-training).

    python -m project export --config configs/cifar10_cnn.yaml \\
        --ckpt lightning_logs/cifar10_cnn/version_0/checkpoints/best.ckpt --data.data_dir data

Writes into a new ``<out>/export/version_N/``: ``model.onnx`` and ``model_int8.onnx`` (ONNX Runtime static
int8, QDQ), ``model.xml``/``.bin`` and ``model_int8.xml``/``.bin`` (OpenVINO IR, int8 through NNCF), each taking
float32 ``[B, C, H, W]`` images in [0, 1]. Int8 is calibrated on ``--calibration-images`` training images. Each
file is loaded back in its runtime and measured on the test split: accuracy and agreement with the fp32
PyTorch network, printed as a table and saved as ``export.json``. Arguments the command does not know
(``--data.*``, ``--model.*``, ``--trainer.*``) are passed to the config, as to ``python -m project fit``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from project.commands._args import check_calibration, check_config, check_passed_on, choose, timing
from project.errors import UserError, exit_on_user_error

FORMATS = ("onnx", "openvino")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m project export",
        description="Export a trained checkpoint to ONNX and OpenVINO, fp32 and post-training int8, and check each.",
        epilog="Other --data.*/--model.*/--trainer.* arguments are passed to the config (e.g. --data.data_dir DIR).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the model's config (e.g. configs/cifar10_cnn.yaml)")
    parser.add_argument("--ckpt", required=True, help="trained fp32 checkpoint of that config")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="also write int8 models")
    parser.add_argument("--calibration-images", type=int, default=300, help="training images that calibrate int8")
    parser.add_argument(
        "--reduce-range", choices=("auto", "on", "off"), default="auto",
        help="ONNX int8 with 7-bit weights: auto = on for CPUs without VNNI (whose int8 kernels saturate otherwise)",
    )
    parser.add_argument("--out", default="lightning_logs", help="the models go to OUT/export/version_N/")
    parser.add_argument("--batch-sizes", default="1,64", help="latency batch sizes, comma-separated (empty: no timing)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls of each model before timing")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls of each model, in turns; the median is reported")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    args, extra = build_parser().parse_known_args(argv)
    check_passed_on(extra, "export")
    args.formats = choose(args.formats, FORMATS, "format")
    if args.int8:
        check_calibration(args.calibration_images)
    args.batch_sizes = timing(args.batch_sizes, args.warmup, args.repeats, allow_none=True)
    check_config(args.config)
    return args, extra


def _unit_images(loader: Any, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images of a split as float32 [0, 1] numpy arrays, with their labels (at most ``limit`` of them)."""
    from project.compression.export import as_unit_float

    images, labels, count = [], [], 0
    for batch in loader:
        images.append(as_unit_float(batch[0]).cpu())
        labels.append(batch[1].cpu())
        count += len(batch[1])
        if limit is not None and count >= limit:
            break
    x, y = torch.cat(images), torch.cat(labels)
    return x[:limit].numpy(), y[:limit].numpy()


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Export, reload and check every model; returns what ``export.json`` holds."""
    from project.checkpoints import check_checkpoint_of_config
    from project.compression import artifacts, deploy
    from project.compression.measure import format_table
    from project.compression.report import next_version_dir
    from project.tasks.init_weights import load_initial_weights

    args, extra = parse_args(argv)
    for fmt in args.formats:
        deploy.require("onnxruntime" if fmt == "onnx" else "openvino")
    if args.int8:
        deploy.require("onnxruntime.quantization" if "onnx" in args.formats else "nncf")
        if "openvino" in args.formats:
            deploy.require("nncf")
    from project.cli import ProjectCLI

    cli = ProjectCLI(args=[f"--config={args.config}", *extra, "--trainer.logger=false"], run=False)
    check_checkpoint_of_config(args.ckpt, cli.model)
    hp, dm = cli.model.hparams, cli.datamodule
    net = cli.model.net.cpu().eval()
    load_initial_weights(net, args.ckpt, hp["arch"])
    shape = (int(hp["in_channels"]), int(hp["image_size"]), int(hp["image_size"]))
    dm.prepare_data()
    dm.setup("fit")
    calibration = _unit_images(dm.train_dataloader(), args.calibration_images)[0] if args.int8 else None
    if calibration is not None and len(calibration) < args.calibration_images:
        raise UserError(f"only {len(calibration)} training images for --calibration-images {args.calibration_images}")
    dm.setup("test")
    images, labels = _unit_images(dm.test_dataloader())
    folder = next_version_dir(args.out, "export")
    print(f"export: writing into {folder}", flush=True)

    mean, std = dm.mean, dm.std
    onnx_fp32 = deploy.export_onnx(net, shape, folder / "model.onnx", mean, std)
    paths: dict[str, Path] = {}
    if "onnx" in args.formats:
        paths["onnx fp32"] = onnx_fp32
        if args.int8:
            reduce = {"auto": None, "on": True, "off": False}[args.reduce_range]
            paths["onnx int8"] = deploy.quantize_onnx(onnx_fp32, folder / "model_int8.onnx", calibration, reduce)
    if "openvino" in args.formats:
        paths["openvino fp32"] = deploy.convert_openvino(onnx_fp32, folder / "model.xml")
        if args.int8:
            paths["openvino int8"] = deploy.convert_openvino(onnx_fp32, folder / "model_int8.xml", calibration)
    if "onnx" not in args.formats:
        onnx_fp32.unlink()

    with torch.no_grad():
        normalised = (torch.from_numpy(images) - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        reference = torch.cat([net(b) for b in normalised.split(256)]).argmax(-1).numpy()
    results: dict[str, dict[str, Any]] = {"pytorch fp32": {"accuracy": float((reference == labels).mean())}}
    for name, path in paths.items():
        model = artifacts.load_runner(path)
        pred = np.concatenate([model(images[i : i + 256]).argmax(-1) for i in range(0, len(images), 256)])
        results[name] = {"artifact": path.name, "accuracy": float((pred == labels).mean()),
                         "agreement": float((pred == reference).mean()), "file_bytes": artifacts.artifact_bytes(path)}
    latency = _time_models(net, paths, images, mean, std, args, results)
    print("\n" + format_table(results, ["accuracy", "agreement", "file_bytes", *latency], first="model") + "\n", flush=True)
    summary = {"config": args.config, "checkpoint": args.ckpt, "calibration_images": args.calibration_images if args.int8 else 0,
               "reduce_range": args.reduce_range, "vnni": deploy.cpu_has_vnni(), "test_images": len(labels),
               "torch_threads": torch.get_num_threads(), "latency": f"median of {args.repeats} calls in turns after "
               f"{args.warmup} warm-up calls each; runtimes at their default threads", "models": results}
    (folder / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "folder": str(folder)}


def _time_models(net: torch.nn.Module, paths: dict[str, Path], images: np.ndarray, mean: Any, std: Any,
                 args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[str]:
    """Latency of every model at each batch size, all measured in turns; flags a figure whose spread is large
    and names the fastest model. Returns the latency keys added to ``results``."""
    from project.compression import artifacts, deploy
    from project.compression.export import with_input_normalization
    from project.compression.measure import time_alternating

    pytorch = with_input_normalization(net, mean, std).eval()
    models = {name: artifacts.load_runner(path) for name, path in paths.items()}
    keys = []
    for batch in args.batch_sizes:
        x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])), dtype=np.float32)
        tx = torch.from_numpy(x)
        fns = {"pytorch fp32": lambda: pytorch(tx), **{name: (lambda m=m: m(x)) for name, m in models.items()}}
        timed = time_alternating(fns, warmup=args.warmup, repeats=args.repeats)
        key = f"latency_ms_b{batch}"
        keys.append(key)
        for name, t in timed.items():
            results[name][key] = t["ms"]
            results[name][f"{key}_iqr"] = t["iqr_ms"]
            if t["spread"] > 0.25:
                print(f"export: {name} at batch {batch} varied widely (IQR {t['iqr_ms']:.3f} ms around "
                      f"{t['ms']:.3f} ms): the machine was busy; measure again", flush=True)
        fastest = min(timed, key=lambda n: timed[n]["ms"])
        print(f"export: fastest at batch {batch}: {fastest} ({timed[fastest]['ms']:.3f} ms, "
              f"{timed['pytorch fp32']['ms'] / timed[fastest]['ms']:.2f}x PyTorch eager fp32)", flush=True)
    return keys


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with one ``error: ...`` line and exit status 2."""
    exit_on_user_error(run, argv)
