"""``python -m project compress``: from a trained checkpoint to a compression report in one command.

    python -m project compress --config configs/mnist_lenet.yaml \\
        --ckpt lightning_logs/mnist_lenet/version_0/checkpoints/best.ckpt \\
        --data.data_dir ../shared/data

Builds the variants ``fp32`` (the checkpoint as is), ``ptq`` (post-training int8 of it, calibrated on
``--calibration-images`` training images, no training), ``unstructured``, ``structured``, ``int8`` (QAT) and
``pruned_int8``: each but fp32 and ptq starts from the checkpoint (``init_from``) and is fine-tuned for
``--finetune-epochs`` with the callbacks of its variant config (``<variant>.yaml`` of ``--variant-dir``,
by default the package's own ``project/commands/compress_variants/``, added after ``--config``). Each is
saved as the ``.pt2`` program a user would ship (taking [0, 1] images), loaded back and measured the same
way (:mod:`project.compression.report`). ``report.md``, ``report.json`` and the plots go to
a new ``<out>/compress/version_N/`` folder, beside the artifacts (``artifacts/``) and the
fine-tuning runs' logs (``finetune/<variant>/``).

Arguments the command does not know (``--data.*``, ``--model.*``, ``--trainer.*``) are passed to every
run, as to ``python -m project fit``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from project.commands._args import check_calibration, check_config, check_passed_on, choose, timing
from project.errors import UserError, exit_on_user_error

VARIANTS = ("fp32", "unstructured", "structured", "ptq", "int8", "pruned_int8")
NO_FINETUNE = ("fp32", "ptq")  # variants built from the checkpoint as is, without a variant config


@contextlib.contextmanager
def variant_dir(folder: str | None):
    """The folder of ``<variant>.yaml`` configs: ``folder``, or the package's own (a real path while open)."""
    if folder is not None:
        yield Path(folder)
        return
    with resources.as_file(resources.files("project.commands") / "compress_variants") as path:
        yield Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m project compress",
        description="Fine-tune pruned/int8 variants of a trained checkpoint and report accuracy, size and latency.",
        epilog="Other --data.*/--model.*/--trainer.* arguments are passed to every run (e.g. --data.data_dir DIR).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the model's config (e.g. configs/mnist_lenet.yaml)")
    parser.add_argument("--ckpt", required=True, help="trained checkpoint of that config (the fp32 variant)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}"
    )
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs of each variant")
    parser.add_argument("--calibration-images", type=int, default=300, help="training images that calibrate ptq")
    parser.add_argument(
        "--variant-dir", default=None,
        help="folder with <variant>.yaml callback configs (default: the package's project/commands/compress_variants/)",
    )
    parser.add_argument("--out", default="lightning_logs", help="the report goes to OUT/NAME/version_N/")
    parser.add_argument("--name", default="compress", help="see --out")
    parser.add_argument("--batch-sizes", default="1,64", help="latency batch sizes, comma-separated")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (absorb compilation)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls; the median is reported")
    parser.add_argument(
        "--compile",
        choices=("none", "all"),
        default="all",
        help="time each artifact eager (none) or through torch.compile with weight freezing (all: int8 runs"
        " oneDNN int8 kernels; every variant compiled, so the comparison stays fair)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads while timing (default: torch's)")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    args, extra = build_parser().parse_known_args(argv)
    check_passed_on(extra, "compress")
    args.variants = choose(args.variants, VARIANTS, "variant")
    if args.finetune_epochs < 1:
        raise UserError(f"--finetune-epochs must be >= 1, got {args.finetune_epochs}")
    if "ptq" in args.variants:
        check_calibration(args.calibration_images)
    args.batch_sizes = timing(args.batch_sizes, args.warmup, args.repeats)
    check_config(args.config)
    with variant_dir(args.variant_dir) as folder:
        for v in args.variants:
            if v not in NO_FINETUNE and not (folder / f"{v}.yaml").is_file():
                raise UserError(f"variant config {folder / f'{v}.yaml'} does not exist: check --variant-dir")
    return args, extra


def _log(message: str) -> None:
    print(message, flush=True)


def _cli(args: list[str]) -> Any:
    """``ProjectCLI(args, run=False)``: the trainer, model and datamodule of a config, not run."""

    from project.cli import ProjectCLI

    return ProjectCLI(args=args, run=False)


def calibration_batches(datamodule: Any, count: int) -> list[torch.Tensor]:
    """The first ``count`` training images, normalised as the network takes them, without augmentation."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches, seen = [], 0
    for batch in datamodule.train_dataloader():
        batches.append(datamodule.transform(batch[0], train=False).cpu()[: count - seen])
        seen += len(batches[-1])
        if seen >= count:
            break
    return batches


def load_test_split(datamodule: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole test split as float32 images in [0, 1] (what every shipped program takes) and labels."""
    from project.compression.export import as_unit_float

    datamodule.prepare_data()
    datamodule.setup("test")
    images, labels = [], []
    for batch in datamodule.test_dataloader():
        images.append(as_unit_float(batch[0]).cpu())
        labels.append(batch[1].cpu())
    return torch.cat(images), torch.cat(labels)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Build, fine-tune, save and measure every variant; write the report. Returns ``report.json``'s content."""
    args, extra = parse_args(argv)
    with variant_dir(args.variant_dir) as folder:
        return _run(args, extra, folder)


def _run(args: argparse.Namespace, extra: list[str], variants_folder: Path) -> dict[str, Any]:
    from project.checkpoints import check_checkpoint_of_config
    from project.compression import report as R
    from project.compression.export import load_program

    common = [f"--config={args.config}", *extra]
    base = _cli([*common, "--trainer.logger=false"])  # never fits: gives the fp32 network and the test split
    check_checkpoint_of_config(args.ckpt, base.model)
    folder = R.next_version_dir(args.out, args.name)
    _log(f"compress: report folder {folder}")
    hp = base.model.hparams
    input_shape = (int(hp["in_channels"]), int(hp["image_size"]), int(hp["image_size"]))
    mean, std = base.datamodule.mean, base.datamodule.std
    _log("compress: loading the test split")
    images, labels = load_test_split(base.datamodule)

    artifacts: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    todo = args.variants
    for i, variant in enumerate(todo, start=1):
        start = time.perf_counter()
        if variant == "fp32":
            from project.tasks.init_weights import load_initial_weights

            _log(f"[{i}/{len(todo)}] fp32: the checkpoint as is")
            net = base.model.net
            load_initial_weights(net, args.ckpt, hp["arch"])
        elif variant == "ptq":
            from project.compression.ptq import quantize_ptq
            from project.tasks.init_weights import load_initial_weights

            _log(f"[{i}/{len(todo)}] ptq: post-training int8, calibrated on {args.calibration_images} training images")
            float_net = copy.deepcopy(base.model.net)
            load_initial_weights(float_net, args.ckpt, hp["arch"])
            net = quantize_ptq(float_net, input_shape, calibration_batches(base.datamodule, args.calibration_images))
        else:
            _log(f"[{i}/{len(todo)}] {variant}: fine-tuning {args.finetune_epochs} epoch(s) from the checkpoint")
            cli = _cli(
                [
                    *common,
                    f"--config={variants_folder / f'{variant}.yaml'}",
                    f"--model.init_args.init_from={args.ckpt}",
                    f"--trainer.max_epochs={args.finetune_epochs}",
                    f"--trainer.logger.init_args.save_dir={folder / 'finetune'}",
                    f"--trainer.logger.init_args.name={variant}",
                ]
            )
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            if cli.trainer.interrupted:
                raise UserError(f"fine-tuning of {variant} was interrupted: no report written")
            net = cli.model.net
        net = net.cpu()
        artifacts[variant] = R.save_artifact(net, input_shape, folder / "artifacts", variant, mean, std)
        seconds[variant] = time.perf_counter() - start
        _log(f"[{i}/{len(todo)}] {variant}: saved {artifacts[variant]} ({seconds[variant]:.0f} s)")

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Any]] = {}
    try:
        for i, variant in enumerate(todo, start=1):
            _log(f"[{i}/{len(todo)}] measuring {variant} from {artifacts[variant].name}")
            model = load_program(artifacts[variant])
            results[variant] = R.measure_variant(
                model, artifacts[variant], images, labels, args.batch_sizes, args.warmup, args.repeats,
                compile=args.compile == "all", log=_log,
            )
            results[variant]["build_s"] = round(seconds[variant], 1)
    finally:
        measured_threads = torch.get_num_threads()
        torch.set_num_threads(threads)

    meta = {
        "config": args.config,
        "checkpoint": args.ckpt,
        "extra_args": " ".join(extra),
        "finetune_epochs": args.finetune_epochs,
        "test_images": len(labels),
        "latency": f"median of {args.repeats} calls after {args.warmup} warm-up, compile={args.compile}",
        "cpu_threads": measured_threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }
    paths = R.write_report(folder, results, meta)
    _log("\n" + R.format_text_table(results) + "\n")
    _log(f"compress: wrote {', '.join(str(p) for p in paths.values())}")
    return {**meta, "folder": str(folder), "variants": results}


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with one ``error: ...`` line and exit status 2."""
    exit_on_user_error(run, argv)


if __name__ == "__main__":
    main()
