"""Int8 quantization through ``torch.export`` + torchao PT2E: prepare for QAT, convert a copy, save, load.

The flow (torchao >= 0.18, x86 CPU backend):

1. :func:`prepare_qat` exports a float network with a dynamic batch dimension and inserts fake-quant
   modules (``X86InductorQuantizer``: per-channel int8 weights, uint8 activations, conv-BN folded for
   QAT). The result is a ``GraphModule`` whose parameters keep the float network's names, so a QAT
   checkpoint and a float one share their weight keys.
2. Training runs on that prepared module. :func:`enable_train_eval` makes ``.train()`` / ``.eval()``
   flip BatchNorm and dropout inside the graph (an exported graph ignores the usual flags).
3. :func:`convert_copy` converts a *copy* to int8 (the training module is never touched), and
   :func:`export_int8` writes it as a ``.pt2`` holding only the int8 weights.
4. :func:`load_int8` / :func:`predict_with_artifact` use such a file; they need only ``torch`` (plus
   ``torchao`` imported for the fast compiled int8 kernels).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import types
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from project.errors import UserError

MIN_TORCHAO = (0, 18)

# Ops whose train/eval behaviour is baked into an exported graph: (op, index of the "training" argument).
_BN_OPS = {torch.ops.aten.batch_norm.default: 5}
_DROPOUT_OPS = {
    torch.ops.aten.dropout.default: 2,
    torch.ops.aten.dropout_.default: 2,
    torch.ops.aten.feature_dropout.default: 2,
    torch.ops.aten.feature_dropout_.default: 2,
    torch.ops.aten.alpha_dropout.default: 2,
    torch.ops.aten.alpha_dropout_.default: 2,
}
_BN_FROZEN_ATTR = "_qat_bn_frozen"


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
        qat_config=lambda: x86_inductor_quantizer.get_default_x86_inductor_quantization_config(is_qat=True),
    )


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


def example_input(input_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    """A fresh random input ``[batch, *input_shape]``: never a dataset slice, whose whole storage
    ``torch.export.save`` would keep."""
    return torch.randn(batch, *input_shape)


def prepare_qat(model: nn.Module, input_shape: tuple[int, ...]) -> torch.fx.GraphModule:
    """Export ``model`` (input ``[B, *input_shape]``, B dynamic) and insert int8 fake-quant modules.

    The model should be in training mode (BatchNorm then trains; :func:`enable_train_eval` lets
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
    quantizer = ao.X86InductorQuantizer().set_global(ao.qat_config())
    prepared = ao.prepare_qat_pt2e(exported.module(), quantizer)
    if not any(node.op == "call_module" and _feeds_weight(node) for node in prepared.graph.nodes):
        raise UserError(
            f"QAT cannot handle {type(model).__name__}: the x86 int8 quantizer found no Conv2d or Linear layer "
            "to quantize; pick an architecture built from conv/linear layers"
        )
    return enable_train_eval(prepared)


def _feeds_weight(node: torch.fx.Node) -> bool:
    """Whether a node's output is the weight argument (index 1) of a conv or linear."""
    weighted = (torch.ops.aten.conv2d.default, torch.ops.aten.conv1d.default, torch.ops.aten.linear.default)
    return any(user.target in weighted and len(user.args) > 1 and user.args[1] is node for user in node.users)


# ---- train / eval on an exported graph -----------------------------------------------------------


def set_graph_mode(gm: torch.fx.GraphModule, training: bool) -> None:
    """Set BatchNorm and dropout ops in ``gm``'s graph to train or eval behaviour.

    BatchNorm stays in eval behaviour (running statistics, no updates) while BN is frozen
    (:func:`freeze_bn`). Rewrites the ``training`` literal of each op, so it keeps every other
    argument (torchao's own helper replaces dropout's ``p`` with 0.5).
    """
    bn_training = training and not getattr(gm, _BN_FROZEN_ATTR, False)
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        index = _BN_OPS.get(node.target)
        want = bn_training
        if index is None:
            index, want = _DROPOUT_OPS.get(node.target), training
        if index is not None and node.args[index] is not want:
            args = list(node.args)
            args[index] = want
            node.args = tuple(args)
            changed = True
    if changed:
        gm.recompile()
    for m in gm.modules():
        m.training = training


def enable_train_eval(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make ``gm.train()`` / ``gm.eval()`` work on an exported graph (what Lightning calls around validation)."""

    def _train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
        set_graph_mode(self, mode)
        return self

    def _eval(self: torch.fx.GraphModule) -> torch.fx.GraphModule:
        set_graph_mode(self, False)
        return self

    gm.train = types.MethodType(_train, gm)  # type: ignore[method-assign]
    gm.eval = types.MethodType(_eval, gm)  # type: ignore[method-assign]
    setattr(gm, _BN_FROZEN_ATTR, False)
    return gm


def freeze_bn(gm: torch.fx.GraphModule, frozen: bool = True) -> None:
    """Freeze (or unfreeze) BatchNorm statistics: normalize with running stats and stop updating them."""
    setattr(gm, _BN_FROZEN_ATTR, frozen)
    set_graph_mode(gm, gm.training)


def bn_frozen(gm: nn.Module) -> bool:
    """Whether :func:`freeze_bn` froze ``gm``'s BatchNorm statistics."""
    return bool(getattr(gm, _BN_FROZEN_ATTR, False))


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
    frozen = bn_frozen(prepared)
    model = copy.deepcopy(prepared)
    setattr(model, _BN_FROZEN_ATTR, frozen)
    set_graph_mode(model, False)
    with torch.no_grad(), _cached_pattern_graphs():
        converted = ao.convert_pt2e(model, fold_quantize=True)
    _strip_unused(converted)
    return converted


def _strip_unused(gm: torch.fx.GraphModule) -> None:
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
def _cached_pattern_graphs() -> Iterator[None]:
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


def export_int8(converted: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Save a converted model as a ``.pt2`` (``torch.export.save``) with a dynamic batch dimension."""
    return save_program(converted, input_shape, path)


def save_program(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """``torch.export`` ``model`` (eval behaviour, batch dimension dynamic) and save it as a lean ``.pt2``.

    The example input and the per-node debug metadata (stack traces, provenance) are dropped, and the
    archive's entries are deflate-compressed: neither is needed to run the program, and the graph would
    otherwise weigh as much as a small model's int8 weights.
    Used for the int8 artifact and, in the benchmark, for the fp32 model it is compared with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(model, (example_input(input_shape),), dynamic_shapes=({0: batch},))
    for node in program.graph.nodes:
        for key in ("stack_trace", "from_node", "source_fn_stack", "nn_module_stack", "torch_fn"):
            node.meta.pop(key, None)
    program.example_inputs = None
    archive = io.BytesIO()
    torch.export.save(program, archive)
    _write_deflated(archive, path)
    return path


def _write_deflated(archive: io.BytesIO, dst: Path) -> None:
    """Write the ``.pt2`` zip ``archive`` to ``dst`` with every entry deflate-compressed (same names, same order).

    ``torch.export.save`` stores entries uncompressed. The graph (``model.json``) and the weight configs
    are verbose JSON that deflate shrinks ~10x; for a small int8 model they otherwise weigh about as much
    as its weights. ``torch.export.load`` reads compressed entries as they are (tested). ``dst`` is
    replaced atomically, so an interrupted save never leaves a half-written file.
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


def load_int8(path: str | Path, compile: bool = False) -> nn.Module:
    """Load an int8 ``.pt2`` written by :func:`export_int8` as a callable module (eval behaviour).

    With ``compile=True`` it is wrapped in ``torch.compile`` with weight freezing, which lowers the
    quantize/dequantize patterns to oneDNN int8 kernels on x86 (torchao registers those passes on import).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"int8 model {path} does not exist: fit with the QAT callback writes <log_dir>/model_int8.pt2")
    _register_int8_ops()
    try:
        program = torch.export.load(str(path))
    except Exception as err:  # a corrupt archive raises zipfile/RuntimeError/KeyError variants
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"int8 model {path} is unreadable ({first}): it is truncated or not a .pt2 export") from None
    module = program.module()
    return compile_int8(module) if compile else module


class CompiledInt8(nn.Module):
    """``torch.compile`` of an int8 module, always called without autograd and with inductor freezing.

    Freezing turns the int8 weights into constants, which lets the x86 passes (torchao registers
    them on import) prepack them and fuse quantize/dequantize patterns into oneDNN int8 kernels.
    The flag is set only around each call (compilation is lazy and recurs for each new batch
    size), and as a global ``torch._inductor.config`` option: passed as ``torch.compile(options=...)``
    it fails on torch 2.14 (``onednn.qconv_prepack`` left unfolded).
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


def compile_int8(module: nn.Module) -> nn.Module:
    """Compile an int8 module (see :class:`CompiledInt8`); the first call per batch size compiles (seconds)."""
    return CompiledInt8(module)


@torch.no_grad()
def predict_with_artifact(
    path: str | Path, dataloader: Iterable[Any], compile: bool = True
) -> dict[str, torch.Tensor]:
    """Predictions ``{"pred": [N], "prob": [N, classes]}`` of the int8 model at ``path`` on ``dataloader``.

    Batches are images ``[B, C, H, W]`` (normalized as in training) or ``(images, ...)`` tuples.
    """
    model = load_int8(path, compile=compile)
    probs = []
    for batch in dataloader:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs.append(model(images).softmax(dim=-1))
    if not probs:
        raise UserError("predict_with_artifact got an empty dataloader: check the predict data")
    prob = torch.cat(probs)
    return {"pred": prob.argmax(dim=-1), "prob": prob}
