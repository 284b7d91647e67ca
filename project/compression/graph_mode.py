"""Train/eval behaviour for an exported graph (``torch.export`` bakes BatchNorm's and dropout's mode into it).

:func:`enable_train_eval` makes ``.train()`` / ``.eval()`` of a QAT-prepared ``GraphModule`` flip BatchNorm
and dropout inside the graph, as Lightning expects around validation; :func:`freeze_bn` keeps BatchNorm on
its running statistics (the last phase of QAT).
"""

import types

import torch
from torch import nn

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
