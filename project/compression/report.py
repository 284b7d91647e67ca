"""The compression report: one row per variant x runtime, each measured from its file on disk.

The figures come from :func:`project.compression.pipeline.measure`. This module names the fastest runtime of
each variant and the Pareto front of accuracy against measured latency (not MACs), and writes ``report.json``,
``report.md``, ``accuracy_vs_size.png`` and ``accuracy_vs_latency.png`` (titled with the model, the data and the
CPU with its int8 flags).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from project.compression import measure as M

#: The report's columns before the latencies, in table order.
KEYS = ["accuracy", "agreement", "parity", "params", "nonzero", "macs", "file_bytes", "gzip_bytes"]
Results = dict[str, dict[str, dict[str, Any]]]  # {variant: {runtime: figures}}


def drifted(results: Results) -> list[str]:
    """One phrase per artifact whose parity is below its bound."""
    return [f"{name} in {runtime} agrees with its PyTorch source on {r['parity']:.2%} of test images "
            f"(bound {r['parity_bound']:.1%})"
            for name, rows in results.items() for runtime, r in rows.items() if r["drift"]]


def rows(results: Results) -> dict[str, dict[str, Any]]:
    """The report's rows, ``"<variant> / <runtime>"`` -> figures, in build order."""
    return {f"{name} / {runtime}": r for name, runtimes in results.items() for runtime, r in runtimes.items()}


def latency_keys(results: Results) -> list[str]:
    """``latency_ms_b<N>`` keys present in the results, by batch size."""
    keys = {k for r in rows(results).values() for k in r if k.startswith("latency_ms_b") and not k.endswith("_iqr")}
    return sorted(keys, key=lambda k: int(k.removeprefix("latency_ms_b")))


def report_keys(results: Results) -> list[str]:
    """The report's columns: :data:`KEYS` and the latency at each batch size measured."""
    return KEYS + latency_keys(results)


def fastest(results: Results, key: str) -> dict[str, str]:
    """The runtime with the lowest ``key`` latency, per variant."""
    return {name: min(runtimes, key=lambda r: runtimes[r][key]) for name, runtimes in results.items() if runtimes}


def pareto_front(results: Results, key: str) -> list[str]:
    """Rows no other row beats on both test accuracy and ``key`` latency, fastest first."""
    table = rows(results)
    front = [n for n, r in table.items()
             if not any(o[key] <= r[key] and o["accuracy"] >= r["accuracy"] and (o[key] < r[key] or o["accuracy"] > r["accuracy"])
                        for o in table.values())]
    return sorted(front, key=lambda n: table[n][key])


def format_text_table(results: Results) -> str:
    """The report's table as aligned plain text (what the command prints)."""
    return M.format_table(rows(results), report_keys(results), first="variant / runtime")


def plot(results: Results, x_key: str, x_label: str, path: Path, title: str, log_x: bool = False,
         front: Sequence[str] = ()) -> Path:
    """Scatter of test accuracy against ``x_key``, one labelled point per row (front joined by a line), as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    table = rows(results)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    for name, r in table.items():
        ax.scatter(r[x_key], 100 * r["accuracy"], s=30)
        ax.annotate(name, (r[x_key], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if front:
        ax.plot([table[n][x_key] for n in front], [100 * table[n]["accuracy"] for n in front], "k--", lw=0.8,
                label="Pareto front")
        ax.legend(fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.25)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_report(folder: Path, results: Results, meta: dict[str, Any], title: str) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the two plots into ``folder``; return the summary written."""
    folder.mkdir(parents=True, exist_ok=True)
    lat = latency_keys(results)
    paths = {"json": folder / "report.json", "md": folder / "report.md", "size_plot": folder / "accuracy_vs_size.png"}
    plot(results, "file_bytes", "file size on disk (bytes)", paths["size_plot"], title, log_x=True)
    summary: dict[str, Any] = {**meta}
    if lat:
        key = lat[-1]
        batch = key.removeprefix("latency_ms_b")
        summary["fastest_runtime"] = {b.removeprefix("latency_ms_b"): fastest(results, b) for b in lat}
        summary["pareto_front"] = pareto_front(results, key)
        paths["latency_plot"] = folder / "accuracy_vs_latency.png"
        plot(results, key, f"CPU latency at batch {batch} (ms, median)", paths["latency_plot"], title, log_x=True,
             front=summary["pareto_front"])
    summary["drift"] = drifted(results)
    paths["json"].write_text(json.dumps({**summary, "variants": results}, indent=2) + "\n")
    settings = "\n".join(f"- {k}: `{v}`" for k, v in meta.items())
    fastest_lines = "\n".join(f"- batch {b}: " + ", ".join(f"{v} in {r}" for v, r in f.items())
                               for b, f in summary.get("fastest_runtime", {}).items())
    drift_lines = "\n".join(f"- {d}" for d in summary["drift"]) or "- none"
    paths["md"].write_text(
        f"# Compression report\n\n{title}\n\n{settings}\n\n"
        f"{M.format_markdown_table(rows(results), report_keys(results), first='variant / runtime')}\n\n"
        "Each row is one file, loaded back from disk in its runtime and fed the test images in [0, 1]: test accuracy, "
        "agreement with the fp32 PyTorch network, parity (agreement with the PyTorch network the file was made from), "
        "the variant's learned tensors and non-zeros and the conv/linear/matmul multiply-accumulates of one image "
        "(dense: zeros count; the same in every runtime), the file's size and gzip size, and CPU latency as the median "
        "of timed calls after warm-up, every file timed in turns.\n\n"
        f"## Fastest runtime per variant\n\n{fastest_lines or '- not timed'}\n\n"
        f"## Pareto front (accuracy vs latency at the largest batch)\n\n"
        + ("\n".join(f"- {n}" for n in summary.get("pareto_front", [])) or "- not timed") + "\n\n"
        f"## Drift (parity below its bound)\n\n{drift_lines}\n\n"
        "![accuracy vs size](accuracy_vs_size.png)\n"
        + ("\n![accuracy vs latency](accuracy_vs_latency.png)\n" if lat else "")
    )
    return {**summary, "paths": {k: str(v) for k, v in paths.items()}}


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
