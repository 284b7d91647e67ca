"""Quantization-aware training: the callback, the int8 copy, the .pt2 artifact, resume, DDP, sparsity."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from lightning import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

pytest.importorskip("torchao")

from project.callbacks.qat import QuantizationAwareTraining  # noqa: E402
from project.compression import quantization as Q  # noqa: E402
from project.compression.export import load_program  # noqa: E402
from project.predictions import predict_with_model_file  # noqa: E402
from project.compression.graph_mode import bn_frozen  # noqa: E402
from project.errors import UserError  # noqa: E402
from project.fit_artifacts import write_fit_artifacts  # noqa: E402
from project.models import build_network  # noqa: E402
from project.tasks import ImageClassifier  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.toys import LoaderData, block_loaders, cpu_trainer, toy_classifier  # noqa: E402


# ---- training, schedule --------------------------------------------------------------------------


class _LossPerEpoch(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss_epoch"]))


def test_qat_trains_logs_int8_accuracy_and_exports(tmp_path):
    seed_everything(0)
    train, val = block_loaders()
    model = toy_classifier()
    losses, qat = _LossPerEpoch(), QuantizationAwareTraining()
    trainer = cpu_trainer(tmp_path, [qat, losses], logger="csv", max_epochs=3)
    trainer.fit(model, datamodule=LoaderData(train, val))

    assert isinstance(model.net, torch.fx.GraphModule)
    fqs = Q.fake_quantizers(model.net)
    assert fqs and all(bool(fq.fake_quant_enabled) for fq in fqs)
    assert not any(type(m) is nn.Conv2d for m in model.modules())  # the float module is gone
    # QAT from scratch learns slower than float (weight ranges adapt by moving average): hence 3 epochs
    assert losses.losses[0] > losses.losses[1] > losses.losses[2], losses.losses
    assert losses.losses[-1] < losses.losses[0] * 0.7, losses.losses
    metrics = trainer.callback_metrics
    assert metrics["val/acc"] > 0.8
    assert abs(float(metrics["val/acc_int8"]) - float(metrics["val/acc"])) <= 0.05
    (path,) = write_fit_artifacts(trainer, model, ["torch"]).values()  # what fit's --export writes
    assert path == Path(trainer.log_dir) / "model.pt2" and path.is_file()
    with zipfile.ZipFile(path) as archive:  # lean: entries deflated, no example inputs
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in archive.infolist())
        assert not any("sample_inputs" in i.filename and i.file_size > 1024 for i in archive.infolist())
    results = trainer.test(model, val, verbose=False)[0]
    assert results["test/acc_int8"] > 0.8


class _Snapshots(Callback):
    """Observer ranges, BN statistics and a conv weight at the start and end of every epoch."""

    def __init__(self) -> None:
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}

    def _snap(self, net: nn.Module) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        return {
            "scales": torch.cat([state[k].flatten() for k in sorted(state) if k.endswith(".scale")]),
            "bn_mean": state["backbone.features.1.running_mean"],
            "conv": state["backbone.features.0.weight"],
        }

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start[trainer.current_epoch] = self._snap(pl_module.net)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.end[trainer.current_epoch] = self._snap(pl_module.net)


def test_observers_and_batchnorm_freeze_at_configured_epochs(tmp_path):
    seed_everything(0)
    train, val = block_loaders(channels=3, size=16, n=128)
    model = toy_classifier(arch="cnn", in_channels=3, image_size=16)
    snaps = _Snapshots()
    qat = QuantizationAwareTraining(freeze_observers_epoch=1, freeze_bn_epoch=2, evaluate_int8=False)
    trainer = cpu_trainer(tmp_path, [qat, snaps], logger="csv", max_epochs=3, limit_val_batches=1)
    trainer.fit(model, datamodule=LoaderData(train, val))

    def moved(epoch: int, key: str) -> bool:
        return not torch.equal(snaps.start[epoch][key], snaps.end[epoch][key])

    assert moved(0, "scales") and moved(0, "bn_mean") and moved(0, "conv")
    assert not moved(1, "scales") and moved(1, "bn_mean") and moved(1, "conv")  # observers frozen
    assert not moved(2, "scales") and not moved(2, "bn_mean") and moved(2, "conv")  # BN frozen too
    assert not Q.observers_enabled(model.net) and bn_frozen(model.net)


def test_start_epoch_trains_float_first(tmp_path):
    seed_everything(0)
    train, val = block_loaders(n=64)
    model = toy_classifier()
    snaps: list[tuple[bool, bool]] = []

    class Probe(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            fqs = Q.fake_quantizers(pl_module.net)
            snaps.append((bool(fqs[0].fake_quant_enabled), "val/acc_int8" in trainer.callback_metrics))

    qat = QuantizationAwareTraining(start_epoch=1)
    trainer = cpu_trainer(tmp_path, [qat, Probe()], logger="csv", max_epochs=2)
    trainer.fit(model, datamodule=LoaderData(train, val))
    # (fake quant on, int8 logged) at the end of each epoch: the epoch-0 validation runs before this hook
    assert snaps[0] == (False, False)
    assert snaps[1][0] is True and "val/acc_int8" in trainer.callback_metrics


# ---- artifact in a fresh process -----------------------------------------------------------------


def test_exported_int8_reloads_in_a_fresh_process(tmp_path):
    seed_everything(0)
    train, val = block_loaders(n=128)
    model = toy_classifier()
    # Full-range int8 on every CPU: this untrained toy's activations often leave their calibrated range, where
    # eager int8 clips at the 7-bit bound of reduce_range (the automatic choice without VNNI) but Inductor's
    # fused oneDNN kernels do not, so compiled and eager logits part by up to a third of the largest logit
    # on such a toy (docs/quantization.md).
    # The trained-CNN test in tests/compression/test_cpu.py checks compiled against eager under reduce_range.
    qat = QuantizationAwareTraining(reduce_range=False)
    trainer = cpu_trainer(tmp_path, [qat], logger="csv", max_epochs=1)
    trainer.fit(model, datamodule=LoaderData(train, val))
    (path,) = write_fit_artifacts(trainer, model, ["torch"]).values()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        expected = Q.convert_copy(model.net)(x)
    torch.save({"x": x}, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        import torchao.quantization.pt2e  # registers the quantized_decomposed ops
        assert not any(m.startswith("project") for m in sys.modules)
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)["x"]
        m = torch.export.load({str(path)!r}).module()
        eager = m(x)
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # int8 fusion passes
        torch._inductor.config.freezing = True
        with torch.no_grad():
            compiled = torch.compile(m, dynamic=False)(x)
        print(json.dumps({{"eager": eager.tolist(), "compiled": compiled.tolist()}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert torch.allclose(torch.tensor(result["eager"]), expected, atol=1e-5)
    compiled = torch.tensor(result["compiled"])
    assert (compiled.argmax(-1) == expected.argmax(-1)).all()
    assert torch.allclose(compiled, expected, atol=0.1 * float(expected.abs().max()))
    pred = predict_with_model_file(path, x.split(4))
    assert torch.equal(pred["pred"], expected.argmax(-1))


# ---- resume, DDP, sparsity -----------------------------------------------------------------------


def test_mid_qat_resume_matches_an_uninterrupted_run(tmp_path):
    def fit(epochs: int, ckpt_path=None, folder="run", reduce_range=None) -> ImageClassifier:
        seed_everything(0)
        train, val = block_loaders(n=96, shuffle=False)
        model = toy_classifier()
        ckpt = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=0)
        qat = QuantizationAwareTraining(freeze_observers_epoch=1, evaluate_int8=False,
                                        reduce_range=reduce_range)
        trainer = cpu_trainer(
            tmp_path / folder, [qat, ckpt], logger="csv", max_epochs=epochs, enable_checkpointing=True
        )
        trainer.fit(model, datamodule=LoaderData(train, val), ckpt_path=ckpt_path, weights_only=True)
        return model

    straight = fit(2, folder="straight")
    fit(1, folder="first")
    last = tmp_path / "first" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    assert any("activation_post_process" in k for k in state)  # taken mid-QAT
    resumed = fit(2, ckpt_path=last, folder="resumed")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert not Q.observers_enabled(resumed.net)
    # the checkpoint records how it quantized; resuming with the other activation range is refused in one line
    saved = torch.load(last, weights_only=True)[QuantizationAwareTraining.CHECKPOINT_KEY]["reduce_range"]
    assert saved == Q.choose_reduce_range()
    with pytest.raises(UserError, match=f"reduce_range: {str(saved).lower()}") as err:
        fit(2, ckpt_path=last, folder="other_range", reduce_range=not saved)
    assert "\n" not in str(err.value)


DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from lightning import seed_everything
from tests.toys import LoaderData, block_loaders, cpu_trainer, toy_classifier
from project.callbacks.qat import QuantizationAwareTraining

seed_everything(0)
train, val = block_loaders(n=128)
model = toy_classifier()
qat = QuantizationAwareTraining()
trainer = cpu_trainer({out!r}, [qat], logger="csv", max_epochs=2, devices=2, strategy="ddp")
trainer.fit(model, datamodule=LoaderData(train, val))
from project.fit_artifacts import write_fit_artifacts
files = write_fit_artifacts(trainer, model, ["torch"])  # every rank calls it, rank 0 writes
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
scales = torch.cat([b.flatten() for n, b in model.named_buffers() if n.endswith(".scale")])
result = {{"rank": trainer.global_rank, "sum": float(flat.double().sum()), "scales": scales.tolist(),
          "acc": float(trainer.callback_metrics["val/acc"]), "acc_int8": float(trainer.callback_metrics["val/acc_int8"]),
          "export": str(files.get("torch", ""))}}
with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump(result, f)
from project.runtime import finish_distributed
finish_distributed()  # what a script that runs the Trainer under DDP ends with (docs/distributed.md)
"""


def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_qat.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0 and "terminate called" not in out.stderr, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["sum"] == pytest.approx(r1["sum"], abs=1e-6)  # gradients were synchronized
    assert r0["scales"] == pytest.approx(r1["scales"])  # observers too (buffers broadcast)
    assert r0["acc"] > 0.8 and r0["acc_int8"] > 0.8 and r0["acc_int8"] == r1["acc_int8"]
    assert Path(r0["export"]).is_file() and r1["export"] == ""  # written once, by rank 0


def test_pruned_weights_stay_zero_through_qat_and_int8(tmp_path):
    seed_everything(0)
    train, val = block_loaders(n=128)
    model = toy_classifier()
    masked = 0
    with torch.no_grad():  # stand-in for a pruned checkpoint: half of each weight matrix set to zero
        for name, p in model.net.named_parameters():
            if p.dim() > 1:
                mask = torch.rand_like(p) < 0.5
                p[mask] = 0
                masked += int(mask.sum())
    trainer = cpu_trainer(tmp_path, [QuantizationAwareTraining()], logger="csv", max_epochs=1)
    trainer.fit(model, datamodule=LoaderData(train, val))
    zeros = sum(int((p == 0).sum()) for p in model.net.parameters() if p.dim() > 1)
    assert zeros >= masked
    int8 = load_program(write_fit_artifacts(trainer, model, ["torch"])["torch"])
    int8_zeros = sum(int((b == 0).sum()) for b in int8.buffers() if b.dtype == torch.int8)
    assert int8_zeros >= masked


# ---- bad input (prepare_qat's own errors: tests/compression/test_quantization.py) -----------------


def test_qat_on_prepared_or_converted_model_is_refused(tmp_path):
    prepared = Q.prepare_qat(build_network("lenet5", 4, 1, 28), (1, 28, 28))
    prepared(torch.randn(2, 1, 28, 28))
    with pytest.raises(UserError, match="already prepared"):
        Q.prepare_qat(prepared, (1, 28, 28))
    with pytest.raises(UserError, match="already converted"):
        Q.prepare_qat(Q.convert_copy(prepared), (1, 28, 28))
    model = toy_classifier()
    twice = [QuantizationAwareTraining(), QuantizationAwareTraining()]
    trainer = cpu_trainer(tmp_path, twice, logger="csv", max_epochs=1)
    train, val = block_loaders(n=32)
    with pytest.raises(UserError, match="already prepared"):
        trainer.fit(model, datamodule=LoaderData(train, val))


def test_bad_schedule_and_old_torchao_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="freeze_observers_epoch"):
        QuantizationAwareTraining(start_epoch=2, freeze_observers_epoch=2)
    with pytest.raises(UserError, match="start_epoch"):
        QuantizationAwareTraining(start_epoch=-1)
    train, val = block_loaders(n=32)
    with pytest.raises(UserError, match="never run"):
        trainer = cpu_trainer(tmp_path, [QuantizationAwareTraining(start_epoch=3)], logger="csv", max_epochs=3)
        trainer.fit(toy_classifier(), datamodule=LoaderData(train, val))
    import torchao

    monkeypatch.setattr(torchao, "__version__", "0.17.1")
    with pytest.raises(UserError, match=r"torchao >= 0\.18"):
        QuantizationAwareTraining()
