"""Deployment formats: ONNX (for ONNX Runtime) and OpenVINO IR, fp32 and int8, with the same input contract as
every program the project ships (float32 ``[B, C, H, W]`` images in [0, 1], normalised inside, any batch size).

- ``.onnx``: ``torch.onnx.export`` (the dynamo exporter) of the network behind its input normalisation, or of a
  ``.pt2`` program the project wrote (:func:`program_to_onnx`): a pruned program exports shrunk or with its zeros,
  an int8 one (QAT or torchao PTQ) as QuantizeLinear/DequantizeLinear pairs carrying its own scales, so ONNX
  Runtime and OpenVINO run the int8 model PyTorch runs. Post-training int8 is also ONNX Runtime's static
  post-training quantization of the fp32 model (QDQ, per-channel int8 weights, uint8
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
from project.compression.export import check_calibration_count, input_contract, with_input_normalization
from project.runtime import keep_signal_stack
from project.errors import UserError



def export_onnx(net: nn.Module, input_shape: Sequence[int], path: Path, mean: Sequence[float], std: Sequence[float]) -> Path:
    """The fp32 network behind its normalisation as ``path`` (.onnx), batch dimension dynamic."""
    require("onnxruntime")
    model = with_input_normalization(net, mean, std).cpu().eval()
    example = torch.rand(2, *input_shape)
    _export(model, (example,), path, type(net).__name__, dynamic_shapes=({0: torch.export.Dim("batch")},))
    _set_metadata(path, {"input_contract": json.dumps(input_contract(input_shape, mean, std))})
    return path


def program_to_onnx(program_path: Path, path: Path) -> Path:
    """The ``.pt2`` program at ``program_path`` (float, pruned or int8) as ``path`` (.onnx), same input contract.

    Int8 programs become QDQ models with the program's own scales and zero points: per-channel int8 weights
    stored as int8, uint8 activations. Where the program quantizes to fewer bits than its type holds (7-bit
    activations, ``reduce_range``), the QuantizeLinear is followed by a Clip to that range, as PyTorch clamps.
    """
    from project.compression.export import load_exported, read_input_contract

    require("onnxruntime")
    program = load_exported(program_path)
    contract = read_input_contract(program_path)
    example = torch.rand(2, contract["channels"], contract["height"], contract["width"])
    qd = torch.ops.quantized_decomposed
    table = {qd.quantize_per_tensor.default: _quantize_per_tensor}
    _export(program, (example,), path, program_path.name, custom_translation_table=table)
    entries = {"input_contract": json.dumps({k: v for k, v in contract.items() if k != "int8"})}
    if "int8" in contract:
        entries.update({k: str(v).lower() for k, v in contract["int8"].items()})
    _set_metadata(path, entries)
    return path


def _quantize_per_tensor(input, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: int):
    """``quantized_decomposed.quantize_per_tensor`` in ONNX: QuantizeLinear, clamped like PyTorch when the range
    is narrower than the type's (onnxscript's own translation saturates to the full type instead)."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops import common

    quantized = op.QuantizeLinear(input, scale, common.constant(zero_point, dtype=dtype))
    full = {2: (0, 255), 3: (-128, 127)}.get(int(dtype))  # ONNX uint8, int8
    if full == (quant_min, quant_max):
        return quantized
    return op.Clip(quantized, common.constant(quant_min, dtype=dtype), common.constant(quant_max, dtype=dtype))


def _export(model, args: tuple, path: Path, what: str, **options) -> None:
    """``torch.onnx.export`` (dynamo) of a module or ExportedProgram to ``path``; failure is one UserError line."""
    try:
        onnx_program = torch.onnx.export(model, args, dynamo=True, verbose=False, **options)
    except Exception as err:  # the exporter raises many types; all mean "this network does not export"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{what} does not export to ONNX ({first})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))


def _set_metadata(path: Path, entries: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def quantize_onnx(fp32: Path, path: Path, calibration: np.ndarray, reduce_range: bool | None = None) -> Path:
    """ONNX Runtime static int8 (QDQ, per-channel weights) of ``fp32`` calibrated on ``calibration`` images."""
    check_calibration_count(len(calibration), "ONNX Runtime's int8")
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
        check_calibration_count(len(calibration), "NNCF's int8")
        nncf = require("nncf")
        batches = np.array_split(calibration.astype(np.float32), max(1, len(calibration) // 32))
        with keep_signal_stack():  # NNCF compiles the model to collect its statistics
            model = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path
