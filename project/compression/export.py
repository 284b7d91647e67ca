"""Every artifact the project ships is written and read here.

**The input contract.** A shipped program takes float32 images ``[B, C, H, W]`` with values in [0, 1]
(torchvision's ``ToImage()`` + ``ToDtype(torch.float32, scale=True)``), any batch size, and normalises
them itself: the dataset's mean and std are the program's first op. The contract is stored in the
archive as ``extra/input.json`` (``torch.export.load(path, extra_files={"input.json": ""})`` reads it);
an int8 program also records there how it was quantized (``"int8": {"reduce_range": ..., "built_with_vnni": ...}``,
see :mod:`project.compression.cpu`).

Formats, chosen by the file's suffix:

- ``.pt2``: a ``torch.export`` program (float, channel-pruned or int8), deflate-compressed. It runs in a
  process with only torch, ``torch.export.load(path).module()(images)``; an int8 program needs torchao
  (or torch's own ``quantized_decomposed`` ops) imported first, which :func:`load_program` does.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from project.errors import UserError

FORMATS = (".pt2",)
MIN_CALIBRATION = 32  # fewest images that calibrate int8 (post-training quantization in any runtime)


def check_calibration_count(count: int, who: str) -> None:
    """At least :data:`MIN_CALIBRATION` calibration images, or one UserError line naming ``who`` asked."""
    if count < MIN_CALIBRATION:
        raise UserError(f"{who} needs at least {MIN_CALIBRATION} calibration images, got {count}: pass more")
INPUT_CONTRACT = "input.json"


def example_input(input_shape: Sequence[int], batch: int = 2, device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh random input ``[batch, *input_shape]``: never a dataset slice, whose whole storage an export keeps."""
    return torch.randn(batch, *input_shape, device=device)


def as_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as float32 in [0, 1]; float images are returned as they are."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel: the first op of every shipped program."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def with_input_normalization(net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """``net`` behind :class:`InputNormalization`: it then takes images in [0, 1]."""
    return nn.Sequential(InputNormalization(mean, std), net)


def input_contract(input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    c, h, w = (list(input_shape) + [None, None])[:3]
    return {
        "dtype": "float32", "layout": "NCHW", "range": [0.0, 1.0], "batch": "any",
        "channels": c, "height": h, "width": w,
        "normalization_inside": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
    }


def save_program(
    model: nn.Module, input_shape: Sequence[int], path: str | Path, mean: Sequence[float], std: Sequence[float]
) -> Path:
    """Export ``model`` (eval behaviour) behind its input normalisation as a lean ``.pt2`` taking [0, 1] images.

    The batch dimension is dynamic. The example input and per-node debug metadata (stack traces, provenance)
    are dropped and the archive's entries deflate-compressed: none is needed to run the program, and the
    graph would otherwise weigh as much as a small model's int8 weights. The file is replaced atomically.
    """
    path = Path(path)
    if path.suffix not in FORMATS:
        raise UserError(f"cannot write {path}: the artifact formats are {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = with_input_normalization(model, mean, std)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(wrapped, (example_input(input_shape),), dynamic_shapes=({0: batch},))
    for node in program.graph.nodes:
        for key in ("stack_trace", "from_node", "source_fn_stack", "nn_module_stack", "torch_fn"):
            node.meta.pop(key, None)
    program.example_inputs = None
    contract = input_contract(input_shape, mean, std)
    settings = getattr(model, "int8_settings", None)  # set by project.compression.quantization on int8 models
    if settings:
        contract["int8"] = settings
    archive = io.BytesIO()
    torch.export.save(program, archive, extra_files={INPUT_CONTRACT: json.dumps(contract)})
    _write_deflated(archive, path)
    return path


def _write_deflated(archive: io.BytesIO, dst: Path) -> None:
    """Write the ``.pt2`` zip ``archive`` to ``dst`` with every entry deflate-compressed (same names, order).

    ``torch.export.save`` stores entries uncompressed; its JSON graph shrinks ~10x. ``torch.export.load``
    reads compressed entries as they are. ``dst`` is replaced atomically.
    """
    partial = dst.with_name(f".{dst.name}.partial")
    try:
        with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info in zin.infolist():
                zout.writestr(info.filename, zin.read(info.filename))
        os.replace(partial, dst)
    finally:
        partial.unlink(missing_ok=True)


def _register_int8_ops() -> None:
    """Register the ``quantized_decomposed`` ops an int8 program calls (needed before loading it)."""
    try:
        import torchao.quantization.pt2e  # noqa: F401  (imports torch's quantized_decomposed library)
    except ImportError:
        import torch.ao.quantization.fx._decomposed  # noqa: F401


def load_program(path: str | Path, compile: bool = False) -> nn.Module:
    """Load a ``.pt2`` written by :func:`save_program` as a callable module taking [0, 1] images.

    With ``compile=True`` it is wrapped in ``torch.compile`` with weight freezing, which lowers int8
    quantize/dequantize patterns to oneDNN kernels on x86 (see :class:`CompiledProgram`).
    """
    module = load_exported(path).module()
    if compile:
        warn_if_saturating(path)
    return CompiledProgram(module) if compile else module


def load_exported(path: str | Path) -> torch.export.ExportedProgram:
    """The ``torch.export`` program stored in a ``.pt2`` (int8 ops registered first); a bad file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: fits write their programs into lightning_logs/<name>/version_N/")
    _register_int8_ops()
    try:
        return torch.export.load(str(path))
    except Exception as err:  # a corrupt archive raises zipfile/RuntimeError/KeyError variants
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{path} is unreadable ({first}): it is truncated or not a .pt2 export") from None


def warn_if_saturating(path: str | Path) -> None:
    """One warning line when a full-range int8 program is about to run on int8 kernels that saturate."""
    from project.compression.cpu import cpu_has_vnni

    try:
        settings = read_input_contract(path).get("int8")
    except (UserError, zipfile.BadZipFile, json.JSONDecodeError):
        return
    if settings and not settings.get("reduce_range") and not cpu_has_vnni():
        warnings.warn(
            f"{path} holds full-range int8 (reduce_range off) and this CPU has no VNNI: its compiled int8 kernels may "
            "saturate and lose accuracy; run it uncompiled, or quantize again with reduce_range on (the default here)",
            stacklevel=2,
        )


def read_input_contract(path: str | Path) -> dict[str, Any]:
    """The input contract stored in a ``.pt2`` written by :func:`save_program`."""
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith(f"extra/{INPUT_CONTRACT}")), None)
        if name is None:
            raise UserError(f"{path} holds no input contract: it was not written by this project")
        return json.loads(archive.read(name))


class CompiledProgram(nn.Module):
    """``torch.compile`` of a loaded program, always called without autograd and with inductor freezing.

    Freezing turns the int8 weights into constants, which lets the x86 passes (torchao registers them on
    import) prepack them and fuse quantize/dequantize patterns into oneDNN int8 kernels. The flag is set
    only around each call (compilation is lazy and recurs for each new batch size), and as a global
    ``torch._inductor.config`` option: passed as ``torch.compile(options=...)`` it fails on torch 2.14
    (``onednn.qconv_prepack`` left unfolded).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        try:  # importing the x86 quantizer registers torchao's int8 fusion passes with inductor
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
        except ImportError:
            pass
        self.module = module
        # static shapes: one graph per batch size (a dynamic-batch recompile trips a stride check in the
        # int8 conv lowering of torch 2.14 + torchao 0.18)
        self.compiled = torch.compile(module, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(x)
