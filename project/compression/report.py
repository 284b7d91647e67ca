"""The compression report: each variant saved as the file a user would ship, measured from it, reported.

Every variant is measured *the same way, from its file on disk*: the ``.pt2`` program is loaded back as a
user would (:func:`project.compression.export.load_program`) and fed test images in [0, 1], then
:mod:`project.compression.measure` gives its test accuracy, parameters and non-zeros, MACs of one image,
file size and gzip size, and CPU latency at each batch size (median of ``repeats`` timed calls after
``warmup`` untimed ones, which also absorb ``torch.compile``'s compilation).

Writes ``report.json``, ``report.md``, ``accuracy_vs_size.png`` and ``accuracy_vs_latency.png``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from project.compression import measure as M
from project.compression import quantization as Q
from project.compression.export import CompiledProgram, save_program

#: The report's columns before the latencies, in table order.
KEYS = ["accuracy", "params", "nonzero", "macs", "file_bytes", "gzip_bytes"]


def save_artifact(
    net: nn.Module, input_shape: Sequence[int], folder: Path, name: str, mean: Sequence[float], std: Sequence[float]
) -> Path:
    """Write ``net`` as the file a user would ship: ``<folder>/<name>.pt2``, int8 when it was prepared for QAT."""
    if Q.fake_quantizers(net):
        net = Q.convert_copy(net)
    else:
        net = copy.deepcopy(net).cpu().eval()
    return save_program(net, input_shape, folder / f"{name}.pt2", mean, std)


def measure_variant(
    model: nn.Module,
    path: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 10,
    repeats: int = 50,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every figure of one variant, from its loaded program ``model`` and its file ``path``."""
    params, nonzero = M.count_parameters(model), M.count_nonzero(model)
    size, gzipped = M.file_bytes(path)
    result: dict[str, Any] = {
        "artifact": path.name,
        "accuracy": M.accuracy(model, images, labels),
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "macs": M.count_macs(model, images[:1]),
        "file_bytes": size,
        "gzip_bytes": gzipped,
    }
    runner = CompiledProgram(model) if compile else model  # inductor with weight freezing (oneDNN kernels)
    for batch in batch_sizes:
        x = _batch(images, batch)
        log(f"  latency at batch {batch} ({warmup} warm-up + {repeats} timed calls{', compiled' if compile else ''})")
        result[f"latency_ms_b{batch}"] = M.measure_latency_ms(lambda: runner(x), warmup=warmup, repeats=repeats)
    return result


def _batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` test images (repeated if the split is smaller), as a contiguous tensor."""
    reps = -(-size // len(images))
    return images.repeat(reps, *[1] * (images.dim() - 1))[:size].contiguous()


# ---- writing -------------------------------------------------------------------------------------


def latency_keys(results: dict[str, dict[str, Any]]) -> list[str]:
    """``latency_ms_b<N>`` keys present in the results, by batch size."""
    keys = {k for r in results.values() for k in r if k.startswith("latency_ms_b")}
    return sorted(keys, key=lambda k: int(k.removeprefix("latency_ms_b")))


def report_keys(results: dict[str, dict[str, Any]]) -> list[str]:
    """The report's columns: :data:`KEYS` and the latency at each batch size measured."""
    return KEYS + latency_keys(results)


def format_text_table(results: dict[str, dict[str, Any]]) -> str:
    """The report's table as aligned plain text (what the command prints)."""
    return M.format_table(results, report_keys(results), first="variant")


def plot(results: dict[str, dict[str, Any]], x_key: str, x_label: str, path: Path, log_x: bool = False) -> Path:
    """Scatter of test accuracy against ``x_key``, one labelled point per variant, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for name, r in results.items():
        ax.scatter(r[x_key], 100 * r["accuracy"], s=30)
        ax.annotate(name, (r[x_key], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.25)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_report(folder: Path, results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the two plots into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    lat = latency_keys(results)
    paths = {
        "json": folder / "report.json",
        "md": folder / "report.md",
        "size_plot": folder / "accuracy_vs_size.png",
        "latency_plot": folder / "accuracy_vs_latency.png",
    }
    plot(results, "file_bytes", "file size on disk (bytes)", paths["size_plot"], log_x=True)
    first_lat = lat[0] if lat else None
    if first_lat:
        batch = first_lat.removeprefix("latency_ms_b")
        plot(results, first_lat, f"CPU latency at batch {batch} (ms, median)", paths["latency_plot"])
    paths["json"].write_text(json.dumps({**meta, "variants": results}, indent=2) + "\n")
    settings = "\n".join(f"- {k}: `{v}`" for k, v in meta.items())
    paths["md"].write_text(
        "# Compression report\n\n"
        f"{settings}\n\n"
        f"{M.format_markdown_table(results, report_keys(results), first='variant')}\n\n"
        "Each variant is measured from its .pt2 file, loaded back as a user would and fed [0, 1] images: accuracy on the test split, "
        "learned tensors' elements (parameters) and how many are non-zero, conv/linear/matmul multiply-accumulates of "
        "one image (dense: zeros count), file size and gzip size, CPU latency as the median of timed calls after "
        "warm-up.\n\n"
        "![accuracy vs size](accuracy_vs_size.png)\n\n"
        "![accuracy vs latency](accuracy_vs_latency.png)\n"
    )
    return paths


def next_version_dir(root: str | os.PathLike, name: str) -> Path:
    """A new, empty ``root/name/version_N`` folder (N one past the highest present); never reuses one."""
    base = Path(root) / name
    base.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.removeprefix("version_")) for p in base.glob("version_*") if p.name[8:].isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        folder = base / f"version_{n}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another report started at the same moment
            n += 1
