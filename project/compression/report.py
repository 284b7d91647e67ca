"""The compression report: save each variant as the file a user would ship, measure it, write the report.

Every variant is measured *the same way, from its file on disk*: the artifact is loaded back
(a plain ``state_dict`` into a fresh network, or a ``torch.export`` ``.pt2`` program), then

- accuracy on the test split (eager, batches of 256);
- parameters and non-zeros: the elements of the learned tensors it holds (float parameters and
  int8 weights; quantization scales/zero points and BatchNorm statistics are not counted);
- MACs: conv/linear multiply-accumulates of one image, counted by ``torch.utils.flop_counter``
  on the loaded artifact (zeros count like any value: the dense cost);
- file size on disk, and gzip-compressed (what unstructured zeros buy);
- CPU latency at each batch size: median of ``repeats`` timed calls after ``warmup`` untimed ones
  (which also absorb ``torch.compile``'s compilation).

Writes ``report.json``, ``report.md``, ``accuracy_vs_size.png`` and ``accuracy_vs_latency.png``.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from project.compression import quantization as Q
from project.compression.measure import measure_latency_ms

#: Names of the columns, in table order: (key in a result, title).
COLUMNS = [
    ("accuracy", "test acc"),
    ("params", "params"),
    ("nonzero", "non-zeros"),
    ("macs", "MACs"),
    ("file_bytes", "file bytes"),
    ("gzip_bytes", "gzip bytes"),
]

# ---- artifacts -----------------------------------------------------------------------------------


def save_artifact(
    net: nn.Module, dense: nn.Module, input_shape: tuple[int, ...], folder: Path, name: str
) -> Path:
    """Write ``net`` as the file a user would ship and return its path.

    - a network prepared for QAT (fake-quant modules): converted to int8, ``<name>.pt2``;
    - a float network with the shapes of ``dense`` (the never-pruned architecture): its plain
      ``state_dict``, ``<name>.pt`` (loads into ``build_network(...)``; unstructured zeros stay in it);
    - anything else (channel-pruned, traced): a float ``torch.export`` program, ``<name>.pt2``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if Q.fake_quantizers(net):
        return Q.export_int8(Q.convert_copy(net), input_shape, folder / f"{name}.pt2")
    if _same_shapes(net, dense):
        path = folder / f"{name}.pt"
        torch.save({k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, path)
        return path
    return Q.save_program(copy.deepcopy(net).cpu().eval(), input_shape, folder / f"{name}.pt2")


def _same_shapes(net: nn.Module, dense: nn.Module) -> bool:
    if isinstance(net, torch.fx.GraphModule):
        return False
    own, ref = net.state_dict(), dense.state_dict()
    return own.keys() == ref.keys() and all(own[k].shape == ref[k].shape for k in own)


def load_artifact(path: Path, build_dense: Callable[[], nn.Module]) -> nn.Module:
    """Load a file written by :func:`save_artifact` (eval behaviour), as a user would."""
    if path.suffix == ".pt":
        net = build_dense()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    return Q.load_int8(path)  # any .pt2 program; registers the int8 ops first in case it needs them


# ---- measuring -----------------------------------------------------------------------------------


def learned_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The learned weights a model holds: its parameters plus int8 weight buffers of a converted graph."""
    tensors = [p.detach() for p in model.parameters()]
    tensors += [b for b in model.buffers() if b.dtype in (torch.int8, torch.uint8)]
    return tensors


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on normalized ``images`` [N, C, H, W]."""
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(dim=-1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (half of ``FlopCounterMode``'s FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops() // 2


def gzip_size(path: Path) -> int:
    """Bytes of the file after gzip (level 6)."""
    return len(gzip.compress(path.read_bytes(), compresslevel=6))


def measure(
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
    """Every figure of one variant, from its loaded artifact ``model`` and its file ``path``."""
    tensors = learned_tensors(model)
    params = sum(t.numel() for t in tensors)
    nonzero = sum(int(torch.count_nonzero(t)) for t in tensors)
    result: dict[str, Any] = {
        "artifact": path.name,
        "accuracy": accuracy(model, images, labels),
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "macs": count_macs(model, images[:1]),
        "file_bytes": path.stat().st_size,
        "gzip_bytes": gzip_size(path),
    }
    runner = Q.compile_int8(model) if compile else model  # inductor with weight freezing (oneDNN kernels)
    for batch in batch_sizes:
        x = _batch(images, batch)
        log(f"  latency at batch {batch} ({warmup} warm-up + {repeats} timed calls{', compiled' if compile else ''})")
        result[f"latency_ms_b{batch}"] = measure_latency_ms(lambda: runner(x), warmup=warmup, repeats=repeats)
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


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key == "accuracy":
        return f"{value:.2%}"
    if key.startswith("latency"):
        return f"{value:.3f}"
    return f"{int(value):,}"


def table_rows(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the report table (one row per variant)."""
    lat = latency_keys(results)
    header = ["variant", *[t for _, t in COLUMNS], *[f"ms @ batch {k.removeprefix('latency_ms_b')}" for k in lat]]
    keys = [k for k, _ in COLUMNS] + lat
    body = [[name, *[_cell(k, r.get(k)) for k in keys]] for name, r in results.items()]
    return header, body


def format_text_table(results: dict[str, dict[str, Any]]) -> str:
    """The table as aligned plain text (what the command prints)."""
    header, body = table_rows(results)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [line(header), "-" * len(line(header)), *[line(r) for r in body]]
    return "\n".join(lines)


def format_markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """The table in Markdown."""
    header, body = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


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
        f"{format_markdown_table(results)}\n\n"
        "Each variant is measured from its file on disk, loaded back as a user would: accuracy on the test split, "
        "learned tensors' elements (parameters) and how many are non-zero, conv/linear multiply-accumulates of one "
        "image (dense: zeros count), file size and gzip size, CPU latency as the median of timed calls after "
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
