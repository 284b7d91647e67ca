"""Structured (channel) pruning with torch-pruning: remove whole filters, get a smaller dense model.

torch-pruning traces the network into a dependency graph, so removing output channels of a
conv also removes the matching BatchNorm channels, the input channels of every consumer, the
flattened inputs of a following Linear and the channels tied through residual additions.

The result is recorded as a *plan*: an ordered list of ``{"layer": name, "idxs": [...]}``
(output channels removed from each root layer). The plan is what makes pruning reproducible:
rank 0 computes it and every DDP rank applies the same one; a checkpoint stores it, so a
resumed or re-tested run rebuilds the pruned shapes before Lightning loads the weights.
"""

import copy
from collections.abc import Sequence

import torch
from torch import nn

from project.errors import UserError

#: Layers whose output channels torch-pruning removes as the root of a group.
PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)

Plan = list[dict[str, object]]


def check_structured_targets(targets: dict[str, nn.Module]) -> None:
    """One-line errors for layers whose output channels torch-pruning cannot remove."""
    for name, module in targets.items():
        if not isinstance(module, PRUNABLE_TYPES):
            raise UserError(
                f"structured pruning removes output channels of Conv2d/Linear layers; {name!r} is a"
                f" {type(module).__name__}: set module_types to Conv2d and/or Linear"
            )
        if isinstance(module, nn.Conv2d) and module.groups not in (1, module.in_channels):
            raise UserError(
                f"structured pruning cannot handle grouped conv {name!r} (groups={module.groups}): exclude it"
            )


def _graph(model: nn.Module, example_input: torch.Tensor):  # -> tp.DependencyGraph
    import torch_pruning as tp

    with torch.enable_grad():  # torch-pruning traces the graph through autograd
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)


def _out_fn(graph, module: nn.Module):
    return graph.get_pruner_of_module(module).prune_out_channels


def compute_plan(
    model: nn.Module,
    example_input: torch.Tensor,
    targets: Sequence[str],
    amount: float,
    norm: int = 2,
    scope: str = "layer",
    round_to: int | None = None,
) -> Plan:
    """Which output channels to remove from the ``targets`` layers (names in ``model``).

    Channels are ranked by the L``norm`` magnitude of their whole group (the filter, its
    BatchNorm scale and the consumers' weights, torch-pruning's ``GroupMagnitudeImportance``);
    ``amount`` of them go, per layer (``scope="layer"``) or with one ranking across layers
    (``"global"``). ``model`` itself is left untouched: the plan is computed on a copy.
    """
    import torch_pruning as tp

    if norm not in (1, 2):
        raise UserError(f"structured pruning norm must be 1 (L1) or 2 (L2), got {norm}")
    if scope not in ("layer", "global"):
        raise UserError(f"structured pruning scope must be 'layer' or 'global', got {scope!r}")
    work = copy.deepcopy(model).eval()
    target_set = set(targets)
    names = {m: n for n, m in work.named_modules()}
    ignored = [m for n, m in work.named_modules() if isinstance(m, PRUNABLE_TYPES) and n not in target_set]
    with torch.enable_grad():  # torch-pruning traces the graph through autograd
        pruner = tp.pruner.BasePruner(
            work,
            example_input,
            importance=tp.importance.GroupMagnitudeImportance(p=norm),
            pruning_ratio=amount,
            global_pruning=scope == "global",
            ignored_layers=ignored,
            round_to=round_to,
        )
    plan: Plan = []
    for group in pruner.step(interactive=True):
        root = group[0]
        plan.append({"layer": names[root.dep.target.module], "idxs": sorted(int(i) for i in root.idxs)})
        group.prune()
    return plan


def apply_plan(model: nn.Module, plan: Plan, example_input: torch.Tensor) -> None:
    """Remove the planned channels from ``model`` in place (same layers, same order)."""
    if not plan:
        return
    graph = _graph(model, example_input)
    for entry in plan:
        layer = model.get_submodule(str(entry["layer"]))
        group = graph.get_pruning_group(layer, _out_fn(graph, layer), list(entry["idxs"]))  # type: ignore[arg-type]
        group.prune()


def zero_plan(model: nn.Module, plan: Plan, example_input: torch.Tensor) -> None:
    """The masked equivalent of :func:`apply_plan`: zero the planned channels instead of removing them.

    Zeroes each group's removed output channels (filter rows and biases of Conv/Linear, scale
    and shift of BatchNorm). In eval mode the masked model computes what the pruned one does.
    """
    graph = _graph(model, example_input)
    for entry in plan:
        layer = model.get_submodule(str(entry["layer"]))
        group = graph.get_pruning_group(layer, _out_fn(graph, layer), list(entry["idxs"]))  # type: ignore[arg-type]
        for dep, idxs in group:
            module = dep.target.module
            if not graph.is_out_channel_pruning_fn(dep.handler) or not isinstance(
                module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
            ):
                continue
            idx = torch.as_tensor(list(idxs), dtype=torch.long)
            with torch.no_grad():
                module.weight[idx] = 0
                if module.bias is not None:
                    module.bias[idx] = 0


def shrink_to_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], example_input: torch.Tensor, prefix: str = ""
) -> bool:
    """Remove channels from ``model`` until its shapes match a channel-pruned ``state_dict``.

    Which channels go does not matter (the weights are loaded next), only how many: for every
    torch-pruning group whose root layer has more output channels than ``state_dict`` says, the
    last ones are removed, with everything that depends on them. This is how a never-pruned
    ``project.models`` network takes the weights of a channel-pruned checkpoint. Returns whether
    anything was removed; a layer *narrower* than the state_dict is a user error.
    """
    graph = _graph(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    roots = []
    for group in graph.get_all_groups(root_module_types=list(PRUNABLE_TYPES)):
        root = group[0].dep.target.module
        if root not in roots:
            roots.append(root)
    changed = False
    for root in roots:
        key = f"{prefix}{names[root]}.weight"
        if key not in state_dict:
            continue
        want, have = state_dict[key].shape[0], root.weight.shape[0]
        if want > have:
            raise UserError(
                f"{key} has {want} output channels in the checkpoint but {have} in the model: wrong architecture"
            )
        if want < have:
            graph.get_pruning_group(root, _out_fn(graph, root), list(range(want, have))).prune()
            changed = True
    return changed
