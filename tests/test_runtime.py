"""``keep_freed_memory``: freed tensor memory is reused instead of page-faulted in again, and the user's own
glibc settings win. Each case runs in a fresh interpreter, as the setting is process-wide."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")

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


def test_freed_tensors_are_reused_without_new_page_faults() -> None:
    default, kept = _probe("default"), _probe("keep")
    pages = 48 * 2**20 // 4096
    assert kept["applied"] is True
    assert default["faults"] > 9 * pages  # every allocation mapped and faulted in afresh
    assert kept["faults"] < 3 * pages  # reused from the heap (glibc may still map a block now and then)


def test_the_users_own_malloc_settings_win() -> None:
    assert _probe("keep", MALLOC_MMAP_THRESHOLD_="131072")["applied"] is False
