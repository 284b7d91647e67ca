"""The files a fit ships: ``--export`` writes the trained network at the end of ``fit``, in the run's folder.

The one place a training run writes deployable files (callbacks only change the network). The network goes
through :func:`project.compression.pipeline.write_artifacts`, the path ``compress`` takes, so a pruned network
ships shrunk or with its zeros and a QAT network as int8 with the scales it learned:

- ``<log_dir>/model.pt2``: the ``torch.export`` program (runtime ``torch``; ``torch.compile`` runs the same file);
- ``<log_dir>/model.onnx``: ONNX Runtime; ``<log_dir>/model.xml`` + ``.bin``: OpenVINO.

Each takes float32 ``[B, C, H, W]`` images in [0, 1] and normalises them itself. ``--export auto`` (the default)
writes the ``.pt2`` when a compression callback (pruning or QAT) changed the network and nothing otherwise;
``none`` writes nothing; a comma-separated list of runtimes writes those.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer

from project.errors import UserError

RUNTIMES = ("torch", "onnxruntime", "openvino")
NAME = "model"


def compresses(callbacks: Sequence[Any]) -> bool:
    """Whether a callback that prunes or quantizes the network is in the run."""
    from project.callbacks import ChannelPruning, MagnitudePruning, QuantizationAwareTraining

    return any(isinstance(c, (ChannelPruning, MagnitudePruning, QuantizationAwareTraining)) for c in callbacks)


def export_runtimes(value: str | None, callbacks: Sequence[Any]) -> list[str]:
    """The runtimes ``--export`` asks for (see the module docstring); a bad value is one UserError line."""
    text = "auto" if value is None else str(value).strip()
    if text == "auto":
        return ["torch"] if compresses(callbacks) else []
    if text == "none":
        return []
    chosen = [r.strip() for r in text.split(",") if r.strip()]
    chosen = ["torch" if r == "torch.compile" else r for r in chosen]  # the same .pt2
    unknown = [r for r in chosen if r not in RUNTIMES]
    if unknown or not chosen:
        raise UserError(f"--export {text!r}: choose auto, none or a comma-separated subset of {','.join(RUNTIMES)}")
    return list(dict.fromkeys(chosen))


def normalization(datamodule: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` the DataModule normalises with: what a shipped program applies itself."""
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is None or std is None:
        raise UserError(
            f"exporting a program needs the data's normalisation: {type(datamodule).__name__} has no mean/std"
            " attributes (the project's DataModules have them); pass --export none"
        )
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def check_export(runtimes: Sequence[str], datamodule: Any) -> None:
    """Before training: everything the export at the end needs is there (fail now, not after the fit)."""
    if not runtimes:
        return
    from project.compression.pipeline import choose_runtimes

    normalization(datamodule)
    choose_runtimes(list(runtimes), ptq=False)


def write_fit_artifacts(trainer: Trainer, pl_module: LightningModule, runtimes: Sequence[str]) -> dict[str, Path]:
    """Write the task's network (its current weights) as ``<log_dir>/model.*`` in ``runtimes``; every rank
    calls it, rank zero writes. Returns ``{runtime: path}`` (empty where nothing was written)."""
    from project.callbacks._task import input_shape, network_of
    from project.compression import quantization as Q
    from project.compression.pipeline import write_artifacts

    log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
    net = network_of(pl_module)
    fake_quant = Q.fake_quantizers(net)
    if not runtimes or not log_dir or trainer.fast_dev_run:
        return {}
    if fake_quant and not any(bool(fq.fake_quant_enabled.item()) for fq in fake_quant):
        print("export: QAT never ran (the fit stopped before its start_epoch): no int8 model to write", flush=True)
        return {}
    files: dict[str, Path] = {}
    if trainer.is_global_zero:
        mean, std = normalization(trainer.datamodule)
        variant = write_artifacts(NAME, net, net, list(runtimes), Path(log_dir), input_shape(pl_module), mean, std,
                                  quantized=bool(fake_quant))
        files = dict(variant.files)
        what = "int8 " if fake_quant else ""
        print(f"export: wrote the {what}model as {', '.join(str(p) for p in dict.fromkeys(files.values()))} "
              "(each takes [0, 1] images; predict --ckpt_path runs it)", flush=True)
    trainer.strategy.barrier("fit_artifacts")
    return files
