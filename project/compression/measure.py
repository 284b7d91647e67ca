"""Size and speed of a model: parameters, non-zeros, MACs, bytes on disk, latency.

Shared by pruning, quantization and the reports, so every table counts the same way.
"""

import copy
import gzip
import io
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (each shared parameter once)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Number of parameter elements that are not exactly zero."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (conv, linear, norm layers).

    Counted by torch-pruning's op counter on a copy of the model, in eval mode. Zeros in the
    weights are counted like any other value: this is the dense cost.
    """
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(copy.deepcopy(model).eval(), example_input)
    return int(macs)


def file_size_bytes(path: str | os.PathLike) -> int:
    """Size of a file on disk in bytes."""
    return os.path.getsize(path)


def state_dict_bytes(model: nn.Module, compress: bool = False) -> int:
    """Bytes of ``torch.save(model.state_dict())``; gzip-compressed bytes when ``compress``.

    The compressed figure shows what unstructured zeros buy on disk, since a dense tensor
    stores its zeros like any other value.
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    return len(gzip.compress(data, compresslevel=6)) if compress else len(data)


def measure_latency_ms(fn: Callable[[], Any], warmup: int = 10, repeats: int = 50) -> float:
    """Median wall-clock milliseconds of ``fn()`` under ``torch.inference_mode``."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def model_stats(model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, float]:
    """The figures of a before/after table: params, non-zeros, sparsity, MACs and state_dict bytes."""
    params = count_parameters(model)
    nonzero = count_nonzero(model)
    stats: dict[str, float] = {
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "file_bytes": state_dict_bytes(model),
        "gzip_bytes": state_dict_bytes(model, compress=True),
    }
    if example_input is not None:
        stats["macs"] = count_macs(model, example_input)
    return stats


def format_stats_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table with one row per named :func:`model_stats` result."""
    columns = [("params", "params"), ("nonzero", "non-zeros"), ("sparsity", "sparsity"), ("macs", "MACs"),
               ("file_bytes", "file bytes"), ("gzip_bytes", "gzip bytes")]

    def cell(key: str, value: float | None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2%}" if key == "sparsity" else f"{int(value):,}"

    header = ["", *[title for _, title in columns]]
    body = [[name, *[cell(key, stats.get(key)) for key, _ in columns]] for name, stats in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [line(r) for r in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
