"""Model compression without Lightning: measuring, unstructured sparsity, channel pruning.

The Lightning side (callbacks that drive these during a fit) is in :mod:`project.callbacks`.
Quantization lives in :mod:`project.compression.quantization` (imported on demand: it needs torchao).
"""

from project.compression.measure import (
    count_macs,
    count_nonzero,
    count_parameters,
    file_size_bytes,
    format_stats_table,
    measure_latency_ms,
    model_stats,
    state_dict_bytes,
)
from project.compression.sparsity import (
    apply_masks,
    compute_masks,
    cubic_sparsity,
    schedule_points,
    select_modules,
    select_parameters,
)
from project.compression.structured import apply_plan, compute_plan, export_pt2, load_pt2, zero_plan

__all__ = [
    "apply_masks",
    "apply_plan",
    "compute_masks",
    "compute_plan",
    "count_macs",
    "count_nonzero",
    "count_parameters",
    "cubic_sparsity",
    "export_pt2",
    "file_size_bytes",
    "format_stats_table",
    "load_pt2",
    "measure_latency_ms",
    "model_stats",
    "schedule_points",
    "select_modules",
    "select_parameters",
    "state_dict_bytes",
    "zero_plan",
]
