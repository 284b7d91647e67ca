"""What the project measures about a model, defined once: every table, callback log, report and benchmark
counts through these functions.

- **Parameters / non-zeros**: elements of the learned tensors a model holds, its parameters plus the int8
  weight buffers of a converted int8 program (quantization scales, zero points and BatchNorm statistics are
  not counted); non-zeros are those elements that are not exactly zero.
- **MACs**: multiply-accumulates of the convolution, linear and matrix-multiply ops of one forward pass on
  one image, counted by ``torch.utils.flop_counter`` (half its FLOPs) on a copy of the model as it runs.
  Zeros in the weights count like any value (the dense cost); bias additions, normalisation, activations
  and pooling are not counted.
- **Bytes**: a file's size on disk, and its size after gzip at level 6 (what unstructured zeros buy).
- **Latency**: the median wall-clock milliseconds of timed calls after untimed warm-up calls.
"""

import copy
import gzip
import io
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def learned_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The learned weights a model holds: its parameters plus the int8 weight buffers of a converted program."""
    tensors = [p.detach() for p in model.parameters()]
    tensors += [b for b in model.buffers() if b.dtype in (torch.int8, torch.uint8)]
    return tensors


def count_parameters(model: nn.Module) -> int:
    """Elements of the model's learned tensors (each shared tensor once)."""
    return sum(t.numel() for t in learned_tensors(model))


def count_nonzero(model: nn.Module) -> int:
    """Elements of the model's learned tensors that are not exactly zero."""
    return sum(int(torch.count_nonzero(t)) for t in learned_tensors(model))


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example_input[:1]`` (see the module docstring).

    Runs on a deep copy, so neither BatchNorm statistics nor quantization observers of ``model`` move.
    """
    from torch.utils.flop_counter import FlopCounterMode

    clone = copy.deepcopy(model)
    if not isinstance(clone, torch.fx.GraphModule):  # an exported graph keeps its own train/eval switch
        clone.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        clone(example_input[:1])
    return counter.get_total_flops() // 2


def gzip_bytes(data: bytes) -> int:
    """Length of ``data`` after gzip at level 6."""
    return len(gzip.compress(data, compresslevel=6))


def file_bytes(path: str | Path) -> tuple[int, int]:
    """``(bytes on disk, bytes after gzip)`` of a file."""
    data = Path(path).read_bytes()
    return len(data), gzip_bytes(data)


def state_dict_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes, bytes after gzip)`` of ``torch.save(model.state_dict())``: a dense tensor stores its zeros."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    return len(data), gzip_bytes(data)


def model_stats(model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, float]:
    """A before/after row: params, non-zeros, sparsity, MACs (with an example input) and state_dict bytes."""
    params, nonzero = count_parameters(model), count_nonzero(model)
    size, gzipped = state_dict_bytes(model)
    stats: dict[str, float] = {
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "file_bytes": size,
        "gzip_bytes": gzipped,
    }
    if example_input is not None:
        stats["macs"] = count_macs(model, example_input)
    return stats


def measure_latency_ms(fn: Callable[[], Any], warmup: int = 10, repeats: int = 50) -> float:
    """Median wall-clock milliseconds of ``fn()`` under ``torch.inference_mode``, after ``warmup`` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def time_alternating(
    fns: dict[str, Callable[[], Any]], warmup: int = 10, repeats: int = 50
) -> dict[str, dict[str, float]]:
    """Latency of several callables measured in turns (one call of each per round), so that a machine's drift
    touches all of them alike: ``{name: {"ms": median, "iqr_ms": interquartile range, "spread": iqr / median}}``.
    Warm-up calls are not timed; autograd is off."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000.0)
    out = {}
    for name, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        out[name] = {"ms": median, "iqr_ms": q3 - q1, "spread": (q3 - q1) / median if median else 0.0}
    return out


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``images`` [N, C, H, W] (in whatever input convention the model takes)."""
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(dim=-1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


# ---- tables --------------------------------------------------------------------------------------------------

#: Column titles of every figure above, in table order.
TITLES = {
    "accuracy": "test acc",
    "agreement": "agreement",
    "params": "params",
    "nonzero": "non-zeros",
    "sparsity": "sparsity",
    "macs": "MACs",
    "file_bytes": "file bytes",
    "gzip_bytes": "gzip bytes",
}


def _title(key: str) -> str:
    if key.startswith("latency_ms_b"):
        return f"ms @ batch {key.removeprefix('latency_ms_b')}"
    return TITLES.get(key, key)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key in ("accuracy", "agreement", "parity", "sparsity"):
        return f"{value:.2%}"
    if key.startswith("latency"):
        return f"{value:.3f}"
    return f"{int(value):,}"


def table_rows(rows: dict[str, dict[str, Any]], keys: Sequence[str], first: str = "") -> tuple[list[str], list[list[str]]]:
    """Header and body of a table with one row per name and one column per key."""
    header = [first, *[_title(k) for k in keys]]
    body = [[name, *[_cell(k, row.get(k)) if row else "n/a" for k in keys]] for name, row in rows.items()]
    return header, body


def format_table(rows: dict[str, dict[str, Any]], keys: Sequence[str], first: str = "") -> str:
    """The table as aligned plain text (names left, figures right)."""
    header, body = table_rows(rows, keys, first)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "-" * len(line(header)), *[line(r) for r in body]])


def format_markdown_table(rows: dict[str, dict[str, Any]], keys: Sequence[str], first: str = "") -> str:
    """The table in Markdown."""
    header, body = table_rows(rows, keys, first)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


#: The columns of the pruning callbacks' before/after tables.
STATS_KEYS = ("params", "nonzero", "sparsity", "macs", "file_bytes", "gzip_bytes")
