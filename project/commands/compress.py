"""``python -m project compress``: from a trained checkpoint to a compression report in one command.

    python -m project compress --config configs/mnist_lenet.yaml \\
        --ckpt lightning_logs/mnist_lenet/version_0/checkpoints/best.ckpt \\
        --data.data_dir ../shared/data

Builds the variants ``fp32`` (the checkpoint as is), ``ptq`` (post-training int8 of it, calibrated on
``--calibration-images`` training images, no training), ``unstructured``, ``structured``, ``int8`` (QAT) and
``pruned_int8``: each but fp32 and ptq starts from the checkpoint (``init_from``) and is fine-tuned for
``--finetune-epochs`` with the callbacks of its variant config (``<variant>.yaml`` of ``--variant-dir``,
by default the package's own ``project/commands/compress_variants/``, added after ``--config``). Each is
shipped in every runtime of ``--runtimes`` (torch ``.pt2`` eager and compiled, ONNX Runtime, OpenVINO; default:
every one installed), each file loaded back and measured the same way, and checked against the PyTorch network
it was made from (:mod:`project.compression.pipeline`). ``report.md``, ``report.json`` and the plots go to
a new ``<out>/compress/version_N/`` folder, beside the artifacts (``artifacts/``) and the
fine-tuning runs' logs (``finetune/<variant>/``). An artifact whose parity falls below its bound (drift) makes
the command exit non-zero naming it, after the report is written, unless ``--allow-drift``.

Arguments the command does not know (``--data.*``, ``--model.*``, ``--trainer.*``) are passed to every
run, as to ``python -m project fit``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shutil
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from project.commands._args import check_config, check_passed_on, choose, timing
from project.commands._data import calibration_batches, load_test_split
from project.commands.finetuning import SCHEDULES, distillation, finetune_schedule
from project.compression.export import check_calibration_count
from project.compression.pipeline import MIN_AGREEMENT_FLOAT, MIN_AGREEMENT_INT8, RUNTIMES
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
    parser.add_argument(
        "--finetune-schedule", choices=SCHEDULES, default="scaled",
        help="LR schedule of the fine-tuning runs: scaled (the config's own schedule with its LRs x "
        "--finetune-lr-scale), cosine (no warm-up) or constant from --finetune-lr-scale x the config's peak LR, or "
        "config (the config's own, from-scratch schedule). Any --model.init_args.optimizer/lr_scheduler argument "
        "given keeps the config's schedule with it",
    )
    parser.add_argument("--finetune-lr-scale", type=float, default=0.1,
                        help="fine-tuning peak LR as a fraction of the config's peak LR")
    parser.add_argument(
        "--distill", action=argparse.BooleanOptionalAction, default=False,
        help="fine-tune each variant with the fp32 checkpoint as its teacher (project.tasks.DistillationClassifier: "
        "its loss, temperature and alpha; the teacher never enters a checkpoint)",
    )
    parser.add_argument("--calibration-images", type=int, default=300, help="training images that calibrate ptq")
    parser.add_argument(
        "--variant-dir", default=None,
        help="folder with <variant>.yaml callback configs (default: the package's project/commands/compress_variants/)",
    )
    parser.add_argument("--out", default="lightning_logs", help="the report goes to OUT/NAME/version_N/")
    parser.add_argument("--name", default="compress", help="see --out")
    parser.add_argument(
        "--reduce-range", choices=("auto", "on", "off"), default="auto",
        help="ONNX Runtime ptq with 7-bit weights: auto = on for CPUs without VNNI (whose int8 kernels saturate otherwise)",
    )
    parser.add_argument("--batch-sizes", default="1,64", help="latency batch sizes, comma-separated (empty: no timing)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (absorb compilation)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls; the median is reported")
    parser.add_argument(
        "--runtimes", default=None,
        help="comma-separated subset of torch,torch.compile,onnxruntime,openvino (default: every one installed;"
        " torch.compile runs the .pt2 with weight freezing, i.e. oneDNN int8 kernels)",
    )
    parser.add_argument("--allow-drift", action="store_true",
                        help="exit 0 even when an artifact's parity with its PyTorch source is below its bound")
    parser.add_argument("--min-agreement-float", type=float, default=MIN_AGREEMENT_FLOAT,
                        help="parity bound of files made without quantization (share of test images)")
    parser.add_argument("--min-agreement-int8", type=float, default=MIN_AGREEMENT_INT8,
                        help="parity bound of int8 files against the float or fake-quant network they come from")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads while timing (default: torch's)")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    args, extra = build_parser().parse_known_args(argv)
    check_passed_on(extra, "compress")
    args.variants = choose(args.variants, VARIANTS, "variant")
    if args.finetune_epochs < 1:
        raise UserError(f"--finetune-epochs must be >= 1, got {args.finetune_epochs}")
    if not 0.0 < args.finetune_lr_scale <= 1.0:
        raise UserError(f"--finetune-lr-scale is a fraction of the config's peak LR in (0, 1], got {args.finetune_lr_scale}")
    if "ptq" in args.variants:
        check_calibration_count(args.calibration_images, "--calibration-images")
    args.batch_sizes = timing(args.batch_sizes, args.warmup, args.repeats, allow_none=True)
    if args.runtimes is not None:
        args.runtimes = choose(args.runtimes, RUNTIMES, "runtime")
    for bound in (args.min_agreement_float, args.min_agreement_int8):
        if not 0.0 <= bound <= 1.0:
            raise UserError(f"--min-agreement-* are shares of test images in [0, 1], got {bound}")
    check_config(args.config)
    with variant_dir(args.variant_dir) as folder:
        for v in args.variants:
            if v not in NO_FINETUNE and not (folder / f"{v}.yaml").is_file():
                raise UserError(f"variant config {folder / f'{v}.yaml'} does not exist: check --variant-dir")
    return args, extra


def _log(message: str) -> None:
    print(message, flush=True)


def _cli(args: list[str]) -> Any:
    """``ProjectCLI(args, run=False)``: the trainer, model and datamodule of a config, not run.

    ``sys.argv`` is hidden meanwhile: it holds this command's own arguments, and LightningCLI warns (with both
    argument lists) whenever it is given ``args`` while ``sys.argv`` has some, once per variant.
    """
    import sys
    from unittest import mock

    from project.cli import ProjectCLI

    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return ProjectCLI(args=args, run=False)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Build, fine-tune, ship and measure every variant in every runtime; write the report. Returns its summary.

    Drift (an artifact below its parity bound) is a UserError after the report is written, unless ``--allow-drift``.
    """
    args, extra = parse_args(argv)
    with variant_dir(args.variant_dir) as folder:
        summary = _run(args, extra, folder)
    if summary["drift"] and not args.allow_drift:
        raise UserError(f"drift: {'; '.join(summary['drift'])}; the report is in {summary['folder']}; "
                        "pass --allow-drift to accept it")
    return summary


def _networks(args: argparse.Namespace, extra: list[str], variants_folder: Path, base: Any, folder: Path,
              calibration: list[torch.Tensor], runtimes: list[str], finetune: list[str]
              ) -> Iterator[tuple[str, torch.nn.Module, torch.nn.Module | None, bool]]:
    """Each variant's ``(name, PyTorch source, network its .pt2 holds, post-training int8?)``, built in turn;
    ``finetune``: the fine-tuning runs' schedule and teacher arguments (:mod:`project.commands.finetuning`)."""
    from project.tasks.init_weights import load_initial_weights

    hp = base.model.hparams
    fp32 = base.model.net
    load_initial_weights(fp32, args.ckpt, hp["arch"])
    todo = args.variants
    for i, variant in enumerate(todo, start=1):
        if variant == "fp32":
            _log(f"[{i}/{len(todo)}] fp32: the checkpoint as is")
            yield variant, fp32, fp32, False
        elif variant == "ptq":
            from project.compression.ptq import quantize_ptq

            _log(f"[{i}/{len(todo)}] ptq: post-training int8 in each runtime, calibrated on {args.calibration_images} "
                 "training images")
            shape = (int(hp["in_channels"]), int(hp["image_size"]), int(hp["image_size"]))
            program = None  # no torch runtime asked for: ONNX Runtime and OpenVINO quantize it themselves
            if set(runtimes) & {"torch", "torch.compile"}:
                try:
                    program = quantize_ptq(copy.deepcopy(fp32), shape, calibration)
                except UserError as err:  # torchao's x86 quantizer cannot annotate some networks (ResNet-18)
                    if not set(runtimes) - {"torch", "torch.compile"}:
                        raise
                    _log(f"  ptq: no .pt2 ({err}); the other runtimes quantize it themselves")
            yield variant, fp32, program, True
        else:
            _log(f"[{i}/{len(todo)}] {variant}: fine-tuning {args.finetune_epochs} epoch(s) from the checkpoint")
            cli = _cli([
                f"--config={args.config}", *extra, *finetune, f"--config={variants_folder / f'{variant}.yaml'}",
                f"--model.init_args.init_from={args.ckpt}", f"--trainer.max_epochs={args.finetune_epochs}",
                f"--trainer.logger.init_args.save_dir={folder / 'finetune'}", f"--trainer.logger.init_args.name={variant}",
            ])
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            if cli.trainer.interrupted:
                raise UserError(f"fine-tuning of {variant} was interrupted: no report written")
            net = cli.model.net.cpu()
            yield variant, net, net, False


def _run(args: argparse.Namespace, extra: list[str], variants_folder: Path) -> dict[str, Any]:
    from project.checkpoints import check_checkpoint_of_config
    from project.compression import pipeline as P
    from project.compression import report as R

    runtimes = P.choose_runtimes(args.runtimes, "ptq" in args.variants, log=_log)
    base = _cli([f"--config={args.config}", *extra, "--trainer.logger=false"])  # never fits: the fp32 network, the data
    check_checkpoint_of_config(args.ckpt, base.model)
    folder = R.next_version_dir(args.out, args.name)
    _log(f"compress: report folder {folder}; runtimes {', '.join(runtimes)}")
    try:
        return _build_and_measure(args, extra, variants_folder, runtimes, base, folder)
    except BaseException:  # bad input found on the way (a network a runtime cannot export), or an interrupt
        shutil.rmtree(folder, ignore_errors=True)  # no half-filled report folder is left behind
        raise


def _build_and_measure(args: argparse.Namespace, extra: list[str], variants_folder: Path, runtimes: list[str],
                       base: Any, folder: Path) -> dict[str, Any]:
    from project.compression import pipeline as P
    from project.compression import report as R
    from project.compression.cpu import cpu_has_vnni, describe_cpu
    from project.compression.quantization import fake_quantizers

    hp = base.model.hparams
    shape = (int(hp["in_channels"]), int(hp["image_size"]), int(hp["image_size"]))
    mean, std = base.datamodule.mean, base.datamodule.std
    _log("compress: loading the test split")
    images, labels = load_test_split(base.datamodule)
    calibration = calibration_batches(base.datamodule, args.calibration_images) if "ptq" in args.variants else []
    unit = (torch.cat(calibration) * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)).numpy() \
        if calibration else None  # the calibration images in [0, 1], for ONNX Runtime's and NNCF's PTQ

    schedule, said = finetune_schedule(base.config, args, extra)
    teacher = distillation(base.config, args)
    if set(args.variants) - set(NO_FINETUNE):
        _log(f"compress: fine-tuning with {said}" + (", the checkpoint as teacher" if teacher else ""))
    variants, seconds = [], {}
    for name, source, program_net, ptq in _networks(args, extra, variants_folder, base, folder, calibration, runtimes,
                                                    [*schedule, *teacher]):
        start = time.perf_counter()
        variants.append(P.write_artifacts(name, source, program_net, runtimes, folder / "artifacts", shape, mean, std,
                                          calibration=unit if ptq else None, quantized=bool(fake_quantizers(source)),
                                          reduce_range={"auto": None, "on": True, "off": False}[args.reduce_range]))
        seconds[name] = time.perf_counter() - start
        _log(f"  {name}: wrote {', '.join(p.name for p in dict.fromkeys(variants[-1].files.values()))}")

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _log("compress: measuring every artifact from disk")
        results = P.measure(variants, images, labels, base.model.net, mean, std, args.batch_sizes, args.warmup, args.repeats,
                            (args.min_agreement_float, args.min_agreement_int8), log=_log)
    finally:
        measured_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    meta = {
        "config": args.config, "checkpoint": args.ckpt, "extra_args": " ".join(extra),
        "finetune_epochs": args.finetune_epochs, "finetune_schedule": said,
        "distilled_from": args.ckpt if teacher else None,
        "test_images": len(labels), "runtimes": runtimes,
        "calibration_images": args.calibration_images if "ptq" in args.variants else 0,
        "reduce_range": args.reduce_range, "vnni": cpu_has_vnni(),
        "latency": f"median of {args.repeats} calls after {args.warmup} warm-up (compilation excluded), "
                   "every artifact timed in turns; ONNX Runtime and OpenVINO at their default threads",
        "cpu_threads": measured_threads, "machine": describe_cpu(), "torch": torch.__version__,
        "build_s": {k: round(v, 1) for k, v in seconds.items()},
    }
    title = f"{hp['arch']} on {type(base.datamodule).__name__}, {describe_cpu()}"
    summary = R.write_report(folder, results, meta, title)
    _log("\n" + R.format_text_table(results) + "\n")
    _log(f"compress: wrote {', '.join(summary['paths'].values())}")
    return {**summary, "folder": str(folder), "variants": results}


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with one ``error: ...`` line and exit status 2."""
    exit_on_user_error(run, argv)


if __name__ == "__main__":
    main()
