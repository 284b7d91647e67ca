"""Post-training static int8 (PTQ) through torchao PT2E: no training, a few hundred calibration images.

The float network is exported in eval mode (BatchNorm then folds into the convolutions), observers are inserted
by the x86 quantizer (per-channel int8 weights, uint8 activations), calibration batches run through it, and the
result is converted to int8. QAT (:mod:`project.compression.quantization`) stays the way to recover accuracy that
PTQ loses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from project.compression.export import check_calibration_count, example_input
from project.compression.quantization import (
    SETTINGS_ATTR,
    annotate_or_explain,
    cached_pattern_graphs,
    check_quantizable,
    require_torchao,
    strip_unused,
    x86_quantizer,
)
from project.errors import UserError


def quantize_ptq(
    model: nn.Module, input_shape: Sequence[int], calibration: Iterable[torch.Tensor], reduce_range: bool | None = None
) -> torch.fx.GraphModule:
    """An int8 copy of ``model`` calibrated on ``calibration`` batches (images as the network takes them).

    ``model`` itself is left untouched. Raises a one-line UserError for a model that is already quantized or
    cannot be exported, and for fewer than :data:`project.compression.export.MIN_CALIBRATION` calibration images. ``reduce_range``: 7-bit
    activations, by default where the CPU has no VNNI (:func:`~project.compression.quantization.x86_quantizer`).
    """
    ao = require_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    check_quantizable(model)
    float_model = copy.deepcopy(model).cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        exported = torch.export.export(float_model, (example_input(input_shape),), dynamic_shapes=({0: batch},))
    except Exception as err:  # torch.export raises many types; all mean "cannot trace this model"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"PTQ cannot handle {type(model).__name__}: torch.export failed ({first})") from None
    quantizer, settings = x86_quantizer(is_qat=False, reduce_range=reduce_range)
    prepared = annotate_or_explain(lambda: prepare_pt2e(exported.module(), quantizer), "PTQ", model)
    seen = 0
    with torch.no_grad():
        for images in calibration:
            prepared(images.cpu().float())
            seen += len(images)
    check_calibration_count(seen, "PTQ")
    with torch.no_grad(), cached_pattern_graphs():
        converted = ao.convert_pt2e(prepared, fold_quantize=True)
    strip_unused(converted)
    setattr(converted, SETTINGS_ATTR, settings)
    return converted
