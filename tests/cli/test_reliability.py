"""Faults: a run killed with SIGKILL resumes to the same result; a diverging run stops cleanly and keeps
its finite checkpoints; checkpoint writes are atomic."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from project.checkpoints import AtomicCheckpointIO
from project.cli import main
from tests.conftest import REPO
from tests.tb import scalars

LENET = str(REPO / "configs" / "mnist_lenet.yaml")


def _args(data_dir: Path, *extra: str) -> list[str]:
    return [
        "fit", f"--config={LENET}", f"--data.data_dir={data_dir}", "--data.val_size=128", "--data.batch_size=32",
        "--data.rotate_degrees=0", "--data.translate=0", "--trainer.max_epochs=3", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", *extra,
    ]


def _versions(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs" / "mnist_lenet").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_result(fake_mnist_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(_args(fake_mnist_dir))
    expected = scalars(_versions(tmp_path)[-1])["test/acc"][-1]

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "project", *_args(fake_mnist_dir, "--trainer.callbacks+=tests.helpers.SlowDown",
                                                 "--trainer.callbacks.seconds=0.15")],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    killed = _versions(tmp_path)[-1].parent / "version_1" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not killed.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # well into epoch 1
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed, weights_only=True)["epoch"] == 0  # the kill came during epoch 1

    main(_args(fake_mnist_dir, "--ckpt_path=last"))
    resumed = _versions(tmp_path)[-1]
    assert resumed.name == "version_2"
    assert scalars(resumed)["test/acc"][-1] == pytest.approx(expected, abs=1e-6)


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_finite_checkpoints(fake_mnist_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(_args(fake_mnist_dir, "--trainer.callbacks+=tests.helpers.PoisonWeightsAtEpoch", "--trainer.callbacks.epoch=1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "became nan at epoch 1, step 13" in err[0], err
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert {p.name for p in checkpoints} == {"best.ckpt", "last.ckpt"}
    for path in checkpoints:
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["epoch"] == 0
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_atomic_checkpoint_write_leaves_the_old_file_when_the_save_fails(tmp_path) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "bad": Unpicklable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
