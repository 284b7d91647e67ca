"""Finding, checking and reading checkpoints: the one place a checkpoint file is read
(:func:`load_checkpoint`) and turned into a network (:func:`load_network`)."""

import os
import pickle
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from project.errors import UserError
from project.models import Classifier, build_network


_LOADED: dict[tuple[str, int, int], dict[str, Any]] = {}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on CPU, with every failure turned into a one-line UserError.

    A command checks a checkpoint at several points: the file is read once and kept while it is unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path (runs keep theirs in lightning_logs/<name>/version_N/checkpoints/)")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        _LOADED.clear()  # one checkpoint at a time is enough
        _LOADED[key] = _read(path)
    return _LOADED[key]


def _read(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise UserError(
                f"checkpoint {path} was refused by torch.load(weights_only=True): it holds Python objects other than tensors and plain data, "
                "which could run code when loaded; only load checkpoints you trust"
            ) from None
        raise UserError(f"checkpoint {path} is unreadable ({first}): it is truncated or not a checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} is unreadable ({first}): it is truncated or not a checkpoint") from None


class ChangesNetwork:
    """Mixin of a callback that changes the network's shape or structure, and so says how checkpoints of its
    runs must be checked. Shared code asks every such class; it knows none of them by name.

    Subclasses are registered when they are defined.
    """

    registry: ClassVar[list[type["ChangesNetwork"]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ChangesNetwork.registry.append(cls)

    @classmethod
    def needed_for(cls, checkpoint: dict[str, Any]) -> str | None:
        """If ``checkpoint`` loads only with this callback in the run: the one-line reason and what to do."""
        return None

    def fits_network_to(self, checkpoint: dict[str, Any]) -> bool:
        """Whether this callback, in the run, gives the network the checkpoint's shapes as it loads."""
        return False


def check_checkpoint_fits(
    path: str | Path, model: nn.Module, callbacks: list[Any] = (), head_prefix: str | None = None
) -> None:
    """Raise a UserError if ``path`` is unreadable or its weights do not fit ``model`` in a run with ``callbacks``.

    ``head_prefix``: the state_dict prefix of the model's classification head, named in the error when only
    the head differs (another ``num_classes``).
    """
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} has no 'state_dict': it is not a Lightning checkpoint of this project")
    for cls in ChangesNetwork.registry:
        reason = cls.needed_for(checkpoint)
        if reason and not any(isinstance(cb, cls) for cb in callbacks):
            raise UserError(f"checkpoint {path} {reason}")
    if any(isinstance(cb, ChangesNetwork) and cb.fits_network_to(checkpoint) for cb in callbacks):
        return
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    if mismatched:
        hint = ""
        if head_prefix and any(m.startswith(head_prefix) for m in mismatched):
            hint = " (the head differs: the checkpoint was trained for another num_classes; use --model.init_from to fine-tune it instead)"
        raise UserError(f"checkpoint {path} does not fit the model: {'; '.join(mismatched[:3])}{hint}")
    common = set(state) & set(own)
    if own and not common:
        raise UserError(f"checkpoint {path} shares no weights with the model: it is of another architecture")


def load_network(path: str | Path, what: str = "checkpoint") -> tuple[Classifier, dict[str, Any]]:
    """The network of a checkpoint written by this project's ``fit``, with its hyper-parameters.

    The architecture comes from the checkpoint's ``hyper_parameters`` (``arch``, ``arch_kwargs``,
    ``num_classes``, ``in_channels``, ``image_size``), the weights from its ``net.*`` entries, loaded strictly.
    ``what`` names the file in messages (``"teacher checkpoint"``). Every problem is a one-line UserError.
    """
    checkpoint = load_checkpoint(path)  # weights_only=True; missing or unreadable -> UserError
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(state, dict) or not {"arch", "num_classes"} <= set(hparams):
        raise UserError(
            f"{what} {path} has no hyper_parameters with 'arch' and 'num_classes' or no state_dict: "
            "use a checkpoint written by `python -m project fit`"
        )
    hparams = dict(hparams)
    hparams.setdefault("in_channels", 1)
    hparams.setdefault("image_size", 28)
    hparams["arch_kwargs"] = dict(hparams.get("arch_kwargs") or {})
    try:
        net = build_network(
            hparams["arch"], hparams["num_classes"], hparams["in_channels"], hparams["image_size"], **hparams["arch_kwargs"]
        )
    except (ValueError, TypeError) as err:
        raise UserError(f"{what} {path}: cannot build its network ({err})") from None
    weights = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(
            f"{what} {path}: its weights do not fit its architecture {hparams['arch']!r} ({first}); "
            "use the fp32 checkpoint of a plain, unpruned and unquantized run"
        ) from None
    return net, hparams


def check_checkpoint_of_config(path: str | Path, model: nn.Module) -> None:
    """``path`` must be a dense checkpoint of the architecture the config builds (``model``, whose ``hparams``
    name its ``arch``): what ``compress`` and ``export`` take. One-line UserError otherwise."""
    from project.compression.artifacts import is_artifact

    if is_artifact(str(path)):
        raise UserError(f"{path} is an exported model: compress and export start from the float Lightning "
                        "checkpoint (.ckpt) it came from")
    checkpoint = load_checkpoint(path)
    for cls in ChangesNetwork.registry:
        reason = cls.needed_for(checkpoint)
        if reason:  # a QAT or channel-pruned checkpoint: not the float network the variants are made from
            raise UserError(f"checkpoint {path} {reason.split(':')[0]}: compress and export start from a float, "
                            "unpruned checkpoint of the config (e.g. the run the compression started from)")
    hparams = checkpoint.get("hyper_parameters") or {}
    want = getattr(model, "hparams", {}).get("arch")
    got = hparams.get("arch")
    if got is not None and want is not None and got != want:
        raise UserError(f"checkpoint {path} is of arch {got!r} but the config builds {want!r}: pass that arch's config")
    check_checkpoint_fits(path, model)


def find_last_checkpoint(run_root: Path) -> Path:
    """The ``last.ckpt`` of the newest earlier version folder under ``run_root`` (``lightning_logs/<name>``)."""
    versions = []
    for d in run_root.glob("version_*"):
        m = re.fullmatch(r"version_(\d+)", d.name)
        if m and (d / "checkpoints" / "last.ckpt").is_file():
            versions.append((int(m.group(1)), d / "checkpoints" / "last.ckpt"))
    if not versions:
        raise UserError(
            f"--ckpt_path last: no earlier run left a last.ckpt under {run_root}/version_*/checkpoints/; "
            "pass a checkpoint's path instead"
        )
    return max(versions)[1]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, then renames it into place.

    A save interrupted by a crash or ``kill -9`` leaves the previous ``last.ckpt``/``best.ckpt`` intact
    (plus, at worst, a ``*.tmp`` file), never a half-written checkpoint that a resume would trust.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
