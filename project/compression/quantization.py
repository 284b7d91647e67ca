"""Int8 quantization through ``torch.export`` + torchao PT2E: the torchao gate, QAT prepare, convert a copy.

The flow (torchao >= 0.18, x86 CPU backend):

1. :func:`prepare_qat` exports a float network with a dynamic batch dimension and inserts fake-quant
   modules (``X86InductorQuantizer``: per-channel int8 weights, uint8 activations, conv-BN folded for
   QAT). The result is a ``GraphModule`` whose parameters keep the float network's names, so a QAT
   checkpoint and a float one share their weight keys.
2. Training runs on that prepared module. :func:`project.compression.graph_mode.enable_train_eval` makes
   ``.train()`` / ``.eval()`` flip BatchNorm and dropout inside the graph (an exported graph ignores the
   usual flags).
3. :func:`convert_copy` converts a *copy* to int8 (the training module is never touched);
   :mod:`project.compression.export` writes and loads it.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from project.compression.cpu import choose_reduce_range, int8_settings
from project.compression.export import example_input
from project.compression.graph_mode import bn_frozen, enable_train_eval, freeze_bn, set_graph_mode
from project.errors import UserError

MIN_TORCHAO = (0, 18)

def require_torchao() -> Any:
    """Import torchao's PT2E pieces, or raise a one-line UserError naming the version needed."""
    try:
        import torchao
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as err:
        raise UserError(
            f"quantization needs torchao >= {MIN_TORCHAO[0]}.{MIN_TORCHAO[1]} with PT2E QAT ({err}): "
            f"pip install 'torchao>={MIN_TORCHAO[0]}.{MIN_TORCHAO[1]}'"
        ) from None
    version = tuple(int(p) for p in torchao.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < MIN_TORCHAO:
        raise UserError(
            f"quantization needs torchao >= {MIN_TORCHAO[0]}.{MIN_TORCHAO[1]}, found {torchao.__version__}: "
            f"pip install -U 'torchao>={MIN_TORCHAO[0]}.{MIN_TORCHAO[1]}'"
        )
    return types.SimpleNamespace(
        prepare_qat_pt2e=prepare_qat_pt2e,
        convert_pt2e=convert_pt2e,
        X86InductorQuantizer=x86_inductor_quantizer.X86InductorQuantizer,
        x86_inductor_quantizer=x86_inductor_quantizer,
    )


def x86_quantizer(is_qat: bool, reduce_range: bool | None = None) -> tuple[Any, dict[str, bool]]:
    """torchao's x86 quantizer (per-channel int8 weights, uint8 activations) and the settings to record.

    ``reduce_range`` (7-bit activations) follows :func:`project.compression.cpu.choose_reduce_range`: on
    where the CPU has no VNNI, whose int8 kernels would otherwise saturate; ``True``/``False`` override.
    """
    xiq = require_torchao().x86_inductor_quantizer
    reduce = choose_reduce_range(reduce_range)
    config = xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat, reduce_range=reduce)
    return xiq.X86InductorQuantizer().set_global(config), int8_settings(reduce)


#: Attribute of a prepared or converted GraphModule holding :func:`project.compression.cpu.int8_settings`;
#: :func:`project.compression.export.save_program` records it in the artifact.
SETTINGS_ATTR = "int8_settings"


# ---- state checks ----------------------------------------------------------------------------------


def fake_quantizers(model: nn.Module) -> list[nn.Module]:
    """The fake-quant modules of a prepared model (empty for a float model)."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    return [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` already holds fake-quant or observer modules (of torchao or torch.ao)."""
    from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase

    legacy = (torch.ao.quantization.FakeQuantizeBase, torch.ao.quantization.ObserverBase)
    return any(isinstance(m, (FakeQuantizeBase, ObserverBase, *legacy)) for m in model.modules())


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` already computes in int8: quantize ops in a graph, or eager quantized modules."""
    for m in model.modules():
        if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
            return True
        if isinstance(m, torch.fx.GraphModule):
            for node in m.graph.nodes:
                if node.op == "call_function" and "quantize" in str(node.target) and "decomposed" in str(node.target):
                    return True
    return False


def check_quantizable(model: nn.Module) -> None:
    """Raise a one-line UserError if QAT cannot start on ``model`` (already converted or prepared)."""
    if is_converted(model):
        raise UserError(
            "QAT was asked on a model that is already converted to int8: start QAT from the float model "
            "(an fp32 checkpoint via init_from), not from an int8 one"
        )
    if is_prepared(model):
        raise UserError(
            "QAT was asked on a model that is already prepared for quantization (it holds fake-quant modules): "
            "use a single QuantizationAwareTraining callback, on a float model"
        )


# ---- prepare ---------------------------------------------------------------------------------------


def prepare_qat(model: nn.Module, input_shape: tuple[int, ...], reduce_range: bool | None = None) -> torch.fx.GraphModule:
    """Export ``model`` (input ``[B, *input_shape]``, B dynamic) and insert int8 fake-quant modules.

    The model should be in training mode (BatchNorm then trains; :func:`~project.compression.graph_mode.enable_train_eval` lets
    ``.eval()`` switch it later). Raises a UserError when the model is already quantized, cannot be
    exported, or has no layer the x86 quantizer handles.
    """
    ao = require_torchao()
    check_quantizable(model)
    was_training = model.training
    model.train()
    batch = torch.export.Dim("batch", min=1)
    try:
        exported = torch.export.export(model, (example_input(input_shape),), dynamic_shapes=({0: batch},))
    except Exception as err:  # torch.export raises many types; all mean "cannot trace this model"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(
            f"QAT cannot handle {type(model).__name__}: torch.export failed ({first}); "
            "use an architecture without data-dependent control flow (mlp, lenet5, cnn, resnet9, resnet18)"
        ) from None
    finally:
        model.train(was_training)
    quantizer, settings = x86_quantizer(is_qat=True, reduce_range=reduce_range)
    prepared = annotate_or_explain(lambda: ao.prepare_qat_pt2e(exported.module(), quantizer), "QAT", model)
    setattr(prepared, SETTINGS_ATTR, settings)
    if not any(node.op == "call_module" and _feeds_weight(node) for node in prepared.graph.nodes):
        raise UserError(
            f"QAT cannot handle {type(model).__name__}: the x86 int8 quantizer found no Conv2d or Linear layer "
            "to quantize; pick an architecture built from conv/linear layers"
        )
    return enable_train_eval(prepared)


def annotate_or_explain(prepare: Any, what: str, model: nn.Module) -> torch.fx.GraphModule:
    """Run torchao's prepare step; a pattern its x86 quantizer cannot annotate becomes a one-line UserError.

    torchao 0.18's quantizer fails, for example, on torchvision's ResNet-18 residual blocks ("Input partition has
    more than one output node"); ONNX Runtime and OpenVINO quantize such networks (``python -m project export``).
    """
    try:
        return prepare()
    except (ValueError, RuntimeError, AssertionError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(
            f"{what} cannot handle {type(model).__name__}: torchao's x86 int8 quantizer failed ({first}); "
            "python -m project export quantizes it for ONNX Runtime and OpenVINO instead"
        ) from None


def _feeds_weight(node: torch.fx.Node) -> bool:
    """Whether a node's output is the weight argument (index 1) of a conv or linear."""
    weighted = (torch.ops.aten.conv2d.default, torch.ops.aten.conv1d.default, torch.ops.aten.linear.default)
    return any(user.target in weighted and len(user.args) > 1 and user.args[1] is node for user in node.users)


def set_observers(model: nn.Module, enabled: bool) -> None:
    """Enable or disable the range observers (scales and zero points stop moving when disabled)."""
    for fq in fake_quantizers(model):
        fq.enable_observer(enabled)


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Enable or disable fake quantization (disabled: the prepared model computes in float)."""
    for fq in fake_quantizers(model):
        fq.enable_fake_quant(enabled)


def observers_enabled(model: nn.Module) -> bool:
    """Whether any observer of ``model`` is still updating."""
    return any(bool(fq.observer_enabled.item()) for fq in fake_quantizers(model))


# ---- convert, save, load -------------------------------------------------------------------------


def convert_copy(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """An int8 model converted from a deep copy of ``prepared``; ``prepared`` itself is left untouched.

    BatchNorm is folded into the convolutions and the weights are stored as int8 (the float
    weights are no longer referenced by the graph).
    """
    ao = require_torchao()
    model = copy.deepcopy(prepared)
    freeze_bn(model, bn_frozen(prepared))
    set_graph_mode(model, False)
    with torch.no_grad(), cached_pattern_graphs():
        converted = ao.convert_pt2e(model, fold_quantize=True)
    strip_unused(converted)
    setattr(converted, SETTINGS_ATTR, getattr(prepared, SETTINGS_ATTR, None))
    return converted


def strip_unused(gm: torch.fx.GraphModule) -> None:
    """Drop the parameters and buffers the graph no longer reads (the float weights after conversion)."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if name not in used:
            owner_name, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            delattr(owner, attr)
    gm.recompile()


_PATTERN_CACHE: dict[Any, torch.fx.GraphModule] = {}


@contextlib.contextmanager
def cached_pattern_graphs() -> Iterator[None]:
    """Cache the small pattern graphs torchao re-exports on every conv-BN fold (~100 exports, ~13 s).

    ``convert_pt2e`` rebuilds the same match/replacement patterns each call; they depend only on the
    pattern's code and captured flags, so one export per pattern per process is enough. If torchao
    moves this private helper, conversion still works, only slower.
    """
    from torchao.quantization.pt2e import qat_utils

    original = getattr(qat_utils, "_get_aten_graph_module_for_pattern", None)
    if original is None:
        yield
        return

    def cached(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any) -> Any:
        try:
            fn = getattr(pattern, "fn", pattern)  # torchao wraps pattern functions in a WrapperModule
            cells = tuple(c.cell_contents for c in (fn.__closure__ or ()))
            shapes = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in example_inputs)
            kw = tuple(sorted((k, tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()))
            key = (fn.__code__, cells, shapes, is_cuda, kw)
            hash(key)
        except (AttributeError, TypeError, ValueError):
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERN_CACHE:
            _PATTERN_CACHE[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERN_CACHE[key])

    qat_utils._get_aten_graph_module_for_pattern = cached
    try:
        yield
    finally:
        qat_utils._get_aten_graph_module_for_pattern = original
