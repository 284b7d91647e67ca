"""Deployment formats: ONNX (for ONNX Runtime) and OpenVINO IR, fp32 and int8, with the same input contract as
every program the project ships (float32 ``[B, C, H, W]`` images in [0, 1], normalised inside, any batch size).

- ``.onnx``: ``torch.onnx.export`` (the dynamo exporter) of the network behind its input normalisation. Int8 is
  ONNX Runtime's static post-training quantization of that fp32 model (QDQ, per-channel int8 weights, uint8
  activations calibrated on training images). Without VNNI, x86 int8 kernels add u8 x s8 products in pairs into
  saturating 16-bit integers; full-range weights then overflow, so ``reduce_range`` (7-bit weights) is chosen
  automatically on such CPUs and recorded in the model's metadata (``reduce_range``).
- ``.xml`` (+ ``.bin``): OpenVINO IR converted from the fp32 ONNX model. Int8 is NNCF's post-training
  quantization of that model, which handles CPUs without VNNI itself.

Each file runs with its runtime alone: :func:`project.compression.artifacts.load_runner` returns a callable over
numpy arrays, and a process that imports neither torch nor this project can do the same with
``onnxruntime.InferenceSession`` or ``openvino.Core().compile_model``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from project.compression.artifacts import require
from project.compression.cpu import choose_reduce_range, cpu_has_vnni
from project.compression.export import MIN_CALIBRATION, input_contract, with_input_normalization
from project.errors import UserError

def check_calibration(images: np.ndarray) -> None:
    if len(images) < MIN_CALIBRATION:
        raise UserError(f"int8 calibration needs at least {MIN_CALIBRATION} images, got {len(images)}: pass more")


def export_onnx(net: nn.Module, input_shape: Sequence[int], path: Path, mean: Sequence[float], std: Sequence[float]) -> Path:
    """The fp32 network behind its normalisation as ``path`` (.onnx), batch dimension dynamic."""
    require("onnxruntime")
    model = with_input_normalization(net, mean, std).cpu().eval()
    example = torch.rand(2, *input_shape)
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False)
    except Exception as err:  # the exporter raises many types; all mean "this network does not export"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{type(net).__name__} does not export to ONNX ({first})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    _set_metadata(path, {"input_contract": json.dumps(input_contract(input_shape, mean, std))})
    return path


def _set_metadata(path: Path, entries: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def quantize_onnx(fp32: Path, path: Path, calibration: np.ndarray, reduce_range: bool | None = None) -> Path:
    """ONNX Runtime static int8 (QDQ, per-channel weights) of ``fp32`` calibrated on ``calibration`` images."""
    check_calibration(calibration)
    ort_quant = require("onnxruntime.quantization")
    reduce = choose_reduce_range(reduce_range)
    name = require("onnxruntime").InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(ort_quant.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration.astype(np.float32), max(1, len(calibration) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        ort_quant.quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        ort_quant.quantize_static(
            str(prepared), str(path), Reader(), quant_format=ort_quant.QuantFormat.QDQ, per_channel=True,
            reduce_range=reduce, activation_type=ort_quant.QuantType.QUInt8, weight_type=ort_quant.QuantType.QInt8,
        )
    _set_metadata(path, {"reduce_range": str(reduce).lower(), "built_with_vnni": str(cpu_has_vnni()).lower()})
    return path


def convert_openvino(onnx_path: Path, path: Path, calibration: np.ndarray | None = None) -> Path:
    """OpenVINO IR (``path`` .xml + .bin) of an fp32 ONNX model; int8 through NNCF when ``calibration`` is given."""
    ov = require("openvino")
    model = ov.convert_model(str(onnx_path))
    if calibration is not None:
        check_calibration(calibration)
        nncf = require("nncf")
        batches = np.array_split(calibration.astype(np.float32), max(1, len(calibration) // 32))
        model = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path
