"""How a DDP command ends, on every rank: ``python -m project fit ... --config configs/trainer/ddp_cpu.yaml`` in a
fresh process (2 gloo processes, the progress bar on as a user has it) exits 0 with no C++ abort after its
closing lines, and rank 0's exit status tells what happened to the rank it launched.

The abort this guards against is a race at interpreter exit (:func:`project.runtime.finish_distributed`), so one
run passing proves little: its rate was measured over many consecutive runs (docs/distributed.md)."""

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.conftest import REPO, run_project

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=20", "--trainer.limit_val_batches=4",
         "--trainer.limit_test_batches=4", "--trainer.enable_model_summary=false"]
ARGS = ["fit", f"--config={REPO / 'configs' / 'quickstart.yaml'}", f"--config={REPO / 'configs' / 'trainer' / 'ddp_cpu.yaml'}"]


def test_ddp_fit_exits_zero_without_an_abort_and_after_its_closing_lines(tmp_path: Path) -> None:
    result = run_project([*ARGS, *QUICK], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "terminate called" not in result.stderr and "Aborted" not in result.stderr, result.stderr[-4000:]
    assert result.stdout.rstrip().splitlines()[-1].startswith("look at it:"), result.stdout[-1000:]
    assert "test/acc" in result.stdout  # the test after fit ran under DDP too


def test_a_rank_that_fails_after_rank_0_is_done_fails_the_command(tmp_path: Path) -> None:
    callbacks = tmp_path / "late_failure.yaml"
    callbacks.write_text(json.dumps({"trainer": {"callbacks": [
        {"class_path": "tests.dist_helpers.FailRankAtExit", "init_args": {"rank": 1, "status": 7}}]}}))
    result = run_project([*ARGS, f"--config={callbacks}", *QUICK, "--test_after_fit=false"], cwd=tmp_path)
    assert result.returncode == 7, (result.returncode, result.stderr[-3000:])
    assert "error: rank 1" in result.stderr and "exited with status 7" in result.stderr, result.stderr[-3000:]
