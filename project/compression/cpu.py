"""What this CPU's int8 kernels can represent, and the quantizer setting that follows from it.

x86 int8 kernels multiply uint8 activations by int8 weights. With VNNI (AVX512-VNNI, AVX-VNNI, AMX) the
products are summed in 32-bit integers. Without it they go through ``vpmaddubsw``, which adds each *pair*
of products into a saturating 16-bit integer: 255 x 127 x 2 overflows, and a full-range int8 model silently
loses accuracy on the fast path (oneDNN through ``torch.compile``, ONNX Runtime) while its reference ops stay
right. Quantizing to 7 bits (``reduce_range``) keeps every pair sum in range.

oneDNN honours ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX2``): a process that caps the ISA below VNNI runs the
saturating kernels even on a VNNI CPU, so :func:`cpu_has_vnni` answers for that process, not for the chip.
"""

from __future__ import annotations

import os
from pathlib import Path

VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
#: ``ONEDNN_MAX_CPU_ISA`` values below the first ISA with VNNI.
ISAS_WITHOUT_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def cpu_has_vnni() -> bool:
    """Whether int8 kernels in this process sum in 32 bits: the CPU has VNNI and oneDNN is not capped below it."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ISAS_WITHOUT_VNNI:
        return False
    return bool(VNNI_FLAGS & cpu_flags())


def choose_reduce_range(override: bool | None = None) -> bool:
    """7-bit quantization (``reduce_range``): ``override`` when given, else on exactly when there is no VNNI."""
    return (not cpu_has_vnni()) if override is None else bool(override)


def int8_settings(reduce_range: bool) -> dict[str, bool]:
    """What an int8 artifact records about its quantization: the range and the CPU it was made on."""
    return {"reduce_range": bool(reduce_range), "built_with_vnni": cpu_has_vnni()}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string where there is none)."""
    import platform

    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """The CPU and its int8 flags in one line, as every measured table states them."""
    flags = sorted(VNNI_FLAGS & cpu_flags())
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    int8 = ", ".join(flags) if flags else "no VNNI"
    return f"{cpu_model()} (int8: {int8}{f'; ONEDNN_MAX_CPU_ISA={capped}' if capped else ''})"
