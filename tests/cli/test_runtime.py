"""Process-wide runtime settings, each case in a fresh interpreter as the settings are process-wide.

``keep_freed_memory``: freed tensor memory is reused instead of page-faulted in again, and the user's own glibc
settings win. ``skip_nvml_probe_without_gpu``: without a GPU, optimizer steps stop loading NVIDIA's library."""

import json
import os
import subprocess
import sys

import pytest
import torch

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")

_PROBE = """
import json, resource, sys, torch
from project.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # 48 MB: above glibc's largest adaptive mmap threshold (32 MB)
    torch.ones(12 * 2**20)
before = faults()  # steady state: like the steps of a training run after its first few
for _ in range(10):
    torch.ones(12 * 2**20)
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def _probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@linux_only
def test_freed_tensors_are_reused_without_new_page_faults() -> None:
    default, kept = _probe("default"), _probe("keep")
    pages = 48 * 2**20 // 4096
    assert kept["applied"] is True
    assert default["faults"] > 9 * pages  # every allocation mapped and faulted in afresh
    assert kept["faults"] < 3 * pages  # reused from the heap (glibc may still map a block now and then)


@linux_only
def test_the_users_own_malloc_settings_win() -> None:
    assert _probe("keep", MALLOC_MMAP_THRESHOLD_="131072")["applied"] is False


_NVML_PROBE = """
import ctypes, json, os, torch
import lightning  # sets PYTORCH_NVML_BASED_CUDA_CHECK=1
from project.runtime import skip_nvml_probe_without_gpu
loads = []
class CountingCDLL(ctypes.CDLL):
    def __init__(self, name, *args, **kwargs):
        loads.append(str(name))
        super().__init__(name, *args, **kwargs)
ctypes.CDLL = CountingCDLL
w = torch.nn.Parameter(torch.ones(3))
opt = torch.optim.AdamW([w], lr=0.1)
def nvml_loads_in_five_steps():
    loads.clear()
    for _ in range(5):
        w.sum().backward()
        opt.step()
    return sum("nvidia-ml" in name for name in loads)
before = nvml_loads_in_five_steps()
skipped = skip_nvml_probe_without_gpu()
print(json.dumps({"before": before, "skipped": skipped, "after": nvml_loads_in_five_steps(),
                  "cuda": torch.cuda.is_available(), "env": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")}))
"""


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="a CPU-only torch never probes NVML")
def test_without_a_gpu_optimizer_steps_stop_loading_nvidias_library() -> None:
    out = subprocess.run([sys.executable, "-c", _NVML_PROBE], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if torch.cuda.device_count() > 0:  # with a GPU the setting stays as Lightning made it
        assert result["skipped"] is False and result["env"] == "1" and result["cuda"] is True
    else:
        assert result["before"] >= 5  # a try at every optimizer step
        assert (result["skipped"], result["after"], result["cuda"], result["env"]) == (True, 0, False, "0")
