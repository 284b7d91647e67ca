"""``init_from``: start a new run from pretrained weights (resuming a run is ``--ckpt_path``'s job).

A source is one of

- a checkpoint of this project (``state_dict`` under ``"state_dict"``, keys ``net.backbone.*`` / ``net.head.*``);
- a plain ``state_dict`` file: this project's keys (with or without the ``net.`` prefix), or torchvision's
  ResNet keys (``conv1.weight``, ``layer1.0...``, ``fc.weight``), which map onto ``backbone.*`` with
  ``fc.*`` as the head;
- a torchvision weights name for ``resnet18`` (``IMAGENET1K_V1``, ``DEFAULT``), downloaded by torchvision.

Backbone tensors must all be present with the right shapes; the head loads only where its shape fits
(another ``num_classes`` keeps the freshly initialised head). The one other tolerated difference is
torchvision's 7x7 ImageNet stem (``conv1.weight``) against this project's 3x3 CIFAR stem, or another
number of input channels: that layer is re-initialised. Anything else is a :class:`UserError`.
Files load through :func:`project.checkpoints.load_checkpoint` (``weights_only=True``).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from project.checkpoints import load_checkpoint
from project.errors import UserError

_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
_TORCHVISION_ARCHS = {"resnet18": "ResNet18_Weights"}
_TORCHVISION_STEM = "backbone.conv1.weight"


@dataclass
class InitSummary:
    """What :func:`load_initial_weights` did, by parameter/buffer name of the network."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in the source, not used (an old head that does not fit)
    reinitialised: list[str] = field(default_factory=list)  # in the network, left at its fresh initialisation

    def __str__(self) -> str:
        return (
            f"init_from {self.source}: loaded {len(self.loaded)} tensors, "
            f"skipped {_short(self.skipped)}, re-initialised {_short(self.reinitialised)}"
        )


def _short(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    more = f", ... (+{len(names) - limit})" if len(names) > limit else ""
    return f"[{shown}{more}]"


def load_initial_weights(net: nn.Module, source: str, arch: str, load_head: bool = True) -> InitSummary:
    """Load ``source`` into ``net`` (a :class:`~project.models.Classifier`) and log what happened.

    ``load_head=False`` keeps the fresh head even where the source's would fit (a new task with as
    many classes as the old one).
    """
    state, torchvision_keys = _read_source(source, arch)
    dropped = [] if load_head else [k for k in state if k.startswith("head.")]
    state = {k: v for k, v in state.items() if k not in dropped}
    summary = _apply(net, state, source, arch, torchvision_keys)
    summary.skipped += dropped
    rank_zero_info(str(summary))
    return summary


# ---- reading -----------------------------------------------------------------------------------------


def _read_source(source: str, arch: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The source's tensors keyed like ``Classifier.state_dict()``, and whether they came in torchvision's naming."""
    path = Path(source).expanduser()
    if path.is_file():
        return _normalise_keys(_load_file(path), source)
    if path.exists():
        raise UserError(f"init_from {source} is a folder: pass a checkpoint or state_dict file")
    looks_like_path = "/" in source or "\\" in source or source.lower().endswith(_FILE_SUFFIXES)
    if looks_like_path:
        raise UserError(f"init_from {source}: no such file; check the path (pretraining runs write lightning_logs/<name>/version_N/checkpoints/best.ckpt)")
    return _torchvision_weights(source, arch), True


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    obj = load_checkpoint(path)  # the project's one reader: weights_only=True, failures as one line
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"init_from {path} holds no state_dict (a dict of tensors): save one with torch.save(model.state_dict(), path)")
    return obj


def _normalise_keys(state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], bool]:
    if any(k.startswith("net.") for k in state):
        # a checkpoint of the LightningModule: keep the network's tensors (metric states etc. are not weights)
        return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}, False
    if any(k.startswith(("backbone.", "head.")) for k in state):
        return dict(state), False
    # torchvision's ResNet naming: everything is backbone except the classifier ``fc``
    mapped = {("head." + k[3:]) if k.startswith("fc.") else ("backbone." + k): v for k, v in state.items()}
    return mapped, True


def _torchvision_weights(name: str, arch: str) -> dict[str, torch.Tensor]:
    import torchvision.models

    if arch not in _TORCHVISION_ARCHS:
        raise UserError(
            f"init_from {name}: no such file, and torchvision weights names only work with arch "
            f"{' / '.join(_TORCHVISION_ARCHS)} (this model is {arch!r}); pass a checkpoint or state_dict file"
        )
    enum = getattr(torchvision.models, _TORCHVISION_ARCHS[arch])
    if name not in enum.__members__:
        raise UserError(f"init_from {name}: no such file, nor a torchvision weights name for {arch} (choose from {', '.join(enum.__members__)})")
    try:
        state = enum[name].get_state_dict(progress=True)
    except Exception as err:  # noqa: BLE001 - offline, proxy, disk full...: all one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"init_from {name}: could not download torchvision's {arch} weights ({first[:120]}); connect to the "
            f"internet, or save them elsewhere (torch.save(torchvision.models.{arch}(weights='{name}').state_dict(), 'w.pth')) "
            "and pass --model.init_from w.pth"
        ) from None
    return {("head." + k[3:]) if k.startswith("fc.") else ("backbone." + k): v for k, v in state.items()}


# ---- applying ----------------------------------------------------------------------------------------


def _apply(net: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str, torchvision_keys: bool) -> InitSummary:
    summary = InitSummary(source=source)
    own = net.state_dict()
    missing, mismatched = [], []
    to_load: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        is_head = key.startswith("head.")
        stem = torchvision_keys and key == _TORCHVISION_STEM
        value = state.get(key)
        if value is not None and value.shape == target.shape:
            to_load[key] = value
        elif is_head or (stem and value is not None):
            summary.reinitialised.append(key)
            if value is not None:
                summary.skipped.append(key)
        elif value is None:
            missing.append(key)
        else:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
    unexpected = [k for k in state if k not in own and not k.startswith("head.")]
    summary.skipped += [k for k in state if k not in own and k.startswith("head.")]
    if missing or mismatched or unexpected:
        parts = [
            f"{label} {_short(names, 3)}"
            for label, names in (("missing", missing), ("shape mismatch", mismatched), ("unexpected", unexpected))
            if names
        ]
        raise UserError(
            f"init_from {source} does not fit arch {arch!r} outside the head: {'; '.join(parts)}; "
            "use weights of the same --model.arch and arch_kwargs"
        )
    net.load_state_dict({**own, **to_load})
    summary.loaded = list(to_load)
    return summary
