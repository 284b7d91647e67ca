"""The one registry of the model files the project ships, by suffix: which runtime runs each, how to load it as
a runner, how big it is on disk.

========  ==============  ==========================================================================
suffix    runtime         written by
========  ==============  ==========================================================================
``.pt2``  torch           :func:`project.compression.export.save_program` (``torch.export``, fp32 or int8)
``.onnx`` onnxruntime     :func:`project.compression.deploy.export_onnx` / ``quantize_onnx``
``.xml``  openvino        :func:`project.compression.deploy.convert_openvino` (with its ``.bin``)
========  ==============  ==========================================================================

Every one takes float32 ``[B, C, H, W]`` images in [0, 1] and normalises them itself, so
:func:`load_runner` gives the same callable for each: numpy images in [0, 1] -> numpy logits. ``predict``, the
export command and anything else that runs a shipped file asks this module, never a suffix list of its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from project.errors import UserError
from project.runtime import keep_signal_stack

RUNTIMES = {".pt2": "torch", ".onnx": "onnxruntime", ".xml": "openvino"}
SUFFIXES = tuple(RUNTIMES)

Runner = Callable[[np.ndarray], np.ndarray]


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` names a model file the project ships (by its suffix)."""
    return Path(str(path)).suffix in RUNTIMES


def require(runtime: str):
    """Import a runtime's package, or raise a one-line UserError saying how to install it."""
    try:
        return importlib.import_module(runtime)
    except ImportError as err:
        raise UserError(f"{runtime} is not installed ({err}): pip install {runtime}") from None


def artifact_files(path: str | Path) -> list[Path]:
    """The files a model is made of: an OpenVINO ``.xml`` and its ``.bin`` weights, else the file itself."""
    path = Path(path)
    weights = path.with_suffix(".bin")
    return [path, weights] if path.suffix == ".xml" and weights.is_file() else [path]


def artifact_bytes(path: str | Path) -> int:
    """Bytes on disk of a model (all its files)."""
    return sum(p.stat().st_size for p in artifact_files(path))


def artifact_gzip_bytes(path: str | Path) -> int:
    """Bytes of a model's files after gzip (level 6), as :func:`project.compression.measure.gzip_bytes` counts."""
    from project.compression.measure import gzip_bytes

    return sum(gzip_bytes(p.read_bytes()) for p in artifact_files(path))


def load_runner(path: str | Path, compile: bool = False) -> Runner:
    """A callable ``images [B, C, H, W] float32 in [0, 1] -> logits`` running ``path`` in its own runtime.

    ``compile`` applies to ``.pt2`` only: ``torch.compile`` with weight freezing (oneDNN int8 kernels on x86).
    A missing, unknown, unreadable file or a runtime that is not installed is a one-line UserError.
    """
    path = Path(path)
    runtime = RUNTIMES.get(path.suffix)
    if runtime is None:
        raise UserError(f"{path}: the model formats are {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass a model that a fit, compress or export wrote")
    if runtime == "torch":
        return _torch_runner(path, compile)
    module = require(runtime)
    try:
        if runtime == "onnxruntime":
            options = module.SessionOptions()
            # no busy-waiting threads between calls: they would take the cores from whatever runs next
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = module.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return lambda images: session.run(None, {name: np.ascontiguousarray(images, dtype=np.float32)})[0]
        # f32: on CPUs with bf16 units (AMX, AVX512-BF16) OpenVINO would otherwise run float ops in bfloat16,
        # a different model from the one exported; int8 layers stay int8 either way
        with keep_signal_stack():
            compiled = module.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return lambda images: compiled(np.ascontiguousarray(images, dtype=np.float32))[0]
    except Exception as err:  # each runtime has its own error types for a corrupt or truncated model
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{path} is unreadable by {runtime} ({first}): it is truncated or not a model") from None


def _torch_runner(path: Path, compile: bool) -> Runner:
    import torch

    from project.compression.export import load_program

    module = load_program(path, compile=compile)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()

    return run
