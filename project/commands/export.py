"""``python -m project export``: a trained checkpoint as ONNX Runtime and OpenVINO models, fp32 and int8.

    python -m project export --config configs/cifar10_cnn.yaml \\
        --ckpt lightning_logs/cifar10_cnn/version_0/checkpoints/best.ckpt --data.data_dir data

A preset of ``python -m project compress`` (same options, same report, same parity check): the variants
``fp32`` and ``ptq`` (post-training int8, each runtime quantizing with its own tool: ONNX Runtime static QDQ,
NNCF for OpenVINO) in the runtimes ``onnxruntime`` and ``openvino``, into a new ``<out>/export/version_N/``:
``artifacts/fp32.onnx``, ``artifacts/ptq.onnx``, ``artifacts/fp32.xml``/``.bin`` and ``artifacts/ptq.xml``/``.bin``,
each taking float32 ``[B, C, H, W]`` images in [0, 1], beside ``report.md``/``report.json``. Any ``compress``
option may be given (``--variants fp32,int8``, ``--runtimes onnxruntime``, ``--no-int8`` for fp32 only).
"""

from __future__ import annotations

import argparse
from typing import Any

from project.commands import compress
from project.errors import exit_on_user_error

DEFAULTS = {"variants": "fp32,ptq", "runtimes": "onnxruntime,openvino", "name": "export"}


def build_parser() -> argparse.ArgumentParser:
    """``compress``'s parser with the export defaults, and ``--no-int8`` (fp32 only)."""
    parser = compress.build_parser()
    parser.prog = "python -m project export"
    parser.description = ("Export a trained checkpoint to ONNX Runtime and OpenVINO, fp32 and post-training int8, "
                          "each file checked against PyTorch: a preset of python -m project compress.")
    parser.set_defaults(**DEFAULTS)
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="also write the post-training int8 models (the ptq variant)")
    return parser


def compress_argv(argv: list[str] | None) -> list[str]:
    """``argv`` as ``compress`` arguments: the export defaults made explicit, ``--no-int8`` as ``--variants fp32``."""
    args, _ = build_parser().parse_known_args(argv)
    variants = "fp32" if not args.int8 and args.variants == DEFAULTS["variants"] else args.variants
    given = [a for a in (argv or []) if a not in ("--int8", "--no-int8")]
    return [*given, f"--variants={variants}", f"--runtimes={args.runtimes}", f"--name={args.name}"]


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Export, reload and check every model; returns the report's summary (see ``compress.run``)."""
    return compress.run(compress_argv(argv))


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with one ``error: ...`` line and exit status 2."""
    exit_on_user_error(run, argv)
