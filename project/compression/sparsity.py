"""Unstructured magnitude pruning: which tensors, how sparse when, and the masks.

Pure tensor code, no Lightning: :class:`project.callbacks.MagnitudePruning` drives it.
Masks are boolean tensors kept *outside* the model (``True`` = kept), so the model's
``state_dict`` always has its plain keys and loads into a never-pruned model.
"""

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from project.errors import UserError


def resolve_module_types(names: Sequence[str]) -> tuple[type[nn.Module], ...]:
    """``["Conv2d", "Linear"]`` -> the ``torch.nn`` classes; a one-line error for unknown names."""
    types = []
    for name in names:
        cls = getattr(nn, name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise UserError(f"module type {name!r} is not a torch.nn layer class: use names like 'Conv2d', 'Linear'")
        types.append(cls)
    if not types:
        raise UserError("module_types is empty: give at least one torch.nn layer class name, e.g. ['Conv2d', 'Linear']")
    return tuple(types)


def _compile(pattern: str | None, what: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UserError(f"{what} {pattern!r} is not a valid regular expression ({err})") from None


def select_modules(
    model: nn.Module,
    module_types: Sequence[str] = ("Conv2d", "Linear"),
    include: str | None = None,
    exclude: str | None = None,
) -> dict[str, nn.Module]:
    """Modules of ``model`` whose type is one of ``module_types`` and whose name matches.

    Names are those of ``model.named_modules()`` (for a task: ``net.backbone.features.0``);
    ``include`` / ``exclude`` are regular expressions searched in them (``re.search``).
    A selection that ends up empty is a user error.
    """
    types = resolve_module_types(module_types)
    inc, exc = _compile(include, "include pattern"), _compile(exclude, "exclude pattern")
    selected = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, types)
        and (inc is None or inc.search(name))
        and (exc is None or not exc.search(name))
    }
    if not selected:
        raise UserError(
            f"no module of type {'/'.join(module_types)} matches include={include!r} exclude={exclude!r}:"
            " check the names printed by print(model)"
        )
    return selected


def select_parameters(modules: Mapping[str, nn.Module], parameter_names: Sequence[str] = ("weight",)) -> list[str]:
    """Fully-qualified names (``<module>.<param>``) of the named parameters the modules have."""
    names = [
        f"{mod_name}.{p}" if mod_name else p
        for mod_name, module in modules.items()
        for p in parameter_names
        if isinstance(getattr(module, p, None), nn.Parameter)
    ]
    if not names:
        raise UserError(f"none of the selected modules has a parameter named {list(parameter_names)}")
    return names


def check_sparsity(value: float, what: str) -> None:
    """Sparsities are fractions in [0, 1): pruning every weight leaves no model."""
    if not 0.0 <= value < 1.0:
        raise UserError(f"{what} must be in [0, 1), got {value}")


def schedule_points(start: int, end: int, frequency: int) -> list[int]:
    """The times (epochs or steps) at which pruning happens: ``start, start+freq, ..., end``.

    ``end`` is always a pruning time even when ``end - start`` is not a multiple of ``frequency``.
    """
    if start < 0:
        raise UserError(f"pruning start must be >= 0, got {start}")
    if end < start:
        raise UserError(f"pruning schedule ends ({end}) before it starts ({start}): set end >= start")
    if frequency < 1:
        raise UserError(f"pruning frequency must be >= 1, got {frequency}")
    points = list(range(start, end + 1, frequency))
    if points[-1] != end:
        points.append(end)
    return points


def cubic_sparsity(t: int, start: int, end: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``, clamped to the schedule.

    Before ``start`` the model is dense (0); ``start == end`` is one-shot pruning to ``final``.
    """
    if t < start:
        return 0.0
    if end == start:
        return final
    progress = min(1.0, (t - start) / (end - start))
    return final + (initial - final) * (1.0 - progress) ** 3


@torch.no_grad()
def compute_masks(
    params: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero the ``round(sparsity * n)`` smallest ``|w|``.

    ``scope="global"`` ranks all tensors together (one threshold), ``"layer"`` each tensor alone.
    Entries already pruned in ``previous`` rank below everything else, so masks only ever grow
    sparser (a weight once removed stays removed) and ties are broken the same way on every rank.
    """
    if scope not in ("global", "layer"):
        raise UserError(f"pruning scope must be 'global' or 'layer', got {scope!r}")
    scores = {}
    for name, p in params.items():
        score = p.detach().abs().float().flatten().cpu()
        if previous is not None and name in previous:
            _check_shape(name, previous[name], p)
            score = torch.where(previous[name].flatten().cpu(), score, torch.full_like(score, -1.0))
        scores[name] = score
    groups = [list(scores)] if scope == "global" else [[name] for name in scores]
    masks: dict[str, torch.Tensor] = {}
    for names in groups:
        flat = torch.cat([scores[n] for n in names])
        k = int(round(sparsity * flat.numel()))
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        if k > 0:
            keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
        offset = 0
        for n in names:
            size = scores[n].numel()
            masks[n] = keep[offset : offset + size].view_as(params[n])
            offset += size
    return masks


def _check_shape(name: str, mask: torch.Tensor, p: torch.Tensor) -> None:
    if mask.shape != p.shape:
        raise UserError(
            f"{name} changed shape from {tuple(mask.shape)} to {tuple(p.shape)} during unstructured pruning:"
            " remove channels (ChannelPruning) before the unstructured schedule starts, not during it"
        )


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned entries of the model's parameters in place."""
    for name, mask in masks.items():
        p = model.get_parameter(name)
        _check_shape(name, mask, p)
        p.mul_(mask.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned entries, so optimizer state does not build up for them."""
    for name, mask in masks.items():
        p = model.get_parameter(name)
        if p.grad is not None:
            p.grad.mul_(mask.to(device=p.grad.device, dtype=p.grad.dtype))


def sparsity_of(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros: over all the tensors together, and per tensor."""
    per, zeros, total = {}, 0, 0
    for name, t in tensors:
        z = int(t.numel() - torch.count_nonzero(t.detach()))
        per[name] = z / t.numel()
        zeros, total = zeros + z, total + t.numel()
    return (zeros / total if total else 0.0), per
