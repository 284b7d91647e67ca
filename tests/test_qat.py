"""Quantization-aware training (issue 5): the callback, the int8 copy, the .pt2 artifact, resume, DDP, sparsity."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("torchao")

from project.callbacks.qat import QuantizationAwareTraining  # noqa: E402
from project.compression import quantization as Q  # noqa: E402
from project.compression.export import load_program, predict_with_program  # noqa: E402
from project.compression.graph_mode import bn_frozen, freeze_bn  # noqa: E402
from project.errors import UserError  # noqa: E402
from project.models import build_network  # noqa: E402
from project.tasks import ImageClassifier  # noqa: E402
from tests.helpers import LoaderData  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _blocks(n: int, seed: int, channels: int = 1, size: int = 28, classes: int = 4) -> TensorDataset:
    """Images whose class is the horizontal band that is brighter: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, channels, size, size, generator=g) * 0.5
    band = size // classes
    for c in range(classes):
        x[y == c, :, c * band : (c + 1) * band, :] += 2.5
    return TensorDataset(x, y)


def _loaders(channels: int = 1, size: int = 28, n: int = 256, shuffle: bool = True):
    train = DataLoader(_blocks(n, 0, channels, size), batch_size=32, shuffle=shuffle)
    val = DataLoader(_blocks(64, 1, channels, size), batch_size=32)
    return train, val


def _trainer(tmp_path: Path, callbacks: list, max_epochs: int, **kwargs) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        **kwargs,
    )


def _model(arch: str = "lenet5", channels: int = 1, size: int = 28) -> ImageClassifier:
    return ImageClassifier(
        num_classes=4, in_channels=channels, image_size=size, arch=arch,
        optimizer=lambda params: torch.optim.AdamW(params, lr=5e-3),
    )


# ---- training, schedule, int8 copy --------------------------------------------------------------


class _LossPerEpoch(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss_epoch"]))


def test_qat_trains_logs_int8_accuracy_and_exports(tmp_path):
    seed_everything(0)
    train, val = _loaders()
    model = _model()
    losses, qat = _LossPerEpoch(), QuantizationAwareTraining()
    trainer = _trainer(tmp_path, [qat, losses], max_epochs=3)
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
    assert qat.export_path is not None and qat.export_path.is_file()
    with zipfile.ZipFile(qat.export_path) as archive:  # lean: entries deflated, no example inputs
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
    train, val = _loaders(channels=3, size=16, n=128)
    model = _model("cnn", channels=3, size=16)
    snaps = _Snapshots()
    qat = QuantizationAwareTraining(freeze_observers_epoch=1, freeze_bn_epoch=2, evaluate_int8=False, export=False)
    trainer = _trainer(tmp_path, [qat, snaps], max_epochs=3, limit_val_batches=1)
    trainer.fit(model, datamodule=LoaderData(train, val))

    def moved(epoch: int, key: str) -> bool:
        return not torch.equal(snaps.start[epoch][key], snaps.end[epoch][key])

    assert moved(0, "scales") and moved(0, "bn_mean") and moved(0, "conv")
    assert not moved(1, "scales") and moved(1, "bn_mean") and moved(1, "conv")  # observers frozen
    assert not moved(2, "scales") and not moved(2, "bn_mean") and moved(2, "conv")  # BN frozen too
    assert not Q.observers_enabled(model.net) and bn_frozen(model.net)


def test_start_epoch_trains_float_first(tmp_path):
    seed_everything(0)
    train, val = _loaders(n=64)
    model = _model()
    snaps: list[tuple[bool, bool]] = []

    class Probe(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            fqs = Q.fake_quantizers(pl_module.net)
            snaps.append((bool(fqs[0].fake_quant_enabled), "val/acc_int8" in trainer.callback_metrics))

    trainer = _trainer(tmp_path, [QuantizationAwareTraining(start_epoch=1, export=False), Probe()], max_epochs=2)
    trainer.fit(model, datamodule=LoaderData(train, val))
    # (fake quant on, int8 logged) at the end of each epoch: the epoch-0 validation runs before this hook
    assert snaps[0] == (False, False)
    assert snaps[1][0] is True and "val/acc_int8" in trainer.callback_metrics


def test_int8_copy_leaves_training_model_untouched():
    torch.manual_seed(0)
    prepared = Q.prepare_qat(build_network("lenet5", 4, 1, 28), (1, 28, 28))
    x = torch.randn(16, 1, 28, 28)
    prepared(x)  # calibrate the observers once
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    code, training = prepared.code, prepared.training
    converted = Q.convert_copy(prepared)
    assert prepared.code == code and prepared.training == training
    after = prepared.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert Q.is_converted(converted) and not Q.is_converted(prepared)
    assert not any(p.dtype == torch.float32 and p.dim() > 1 for p in converted.parameters())  # fp32 weights gone
    prepared.eval()
    with torch.no_grad():
        assert (converted(x).argmax(-1) == prepared(x).argmax(-1)).float().mean() >= 0.9


def test_train_eval_switches_batchnorm_and_dropout_in_the_graph():
    prepared = Q.prepare_qat(build_network("cnn", 4, 3, 16, dropout=0.3), (3, 16, 16))
    prepared.eval()
    assert "True" not in str([n.args for n in prepared.graph.nodes if "batch_norm" in str(n.target) or "dropout" in str(n.target)])
    prepared.train()
    drop = [n for n in prepared.graph.nodes if "dropout" in str(n.target)]
    assert drop and drop[0].args[1] == 0.3 and drop[0].args[2] is True  # p kept (torchao's helper resets it)
    freeze_bn(prepared)
    bn = [n for n in prepared.graph.nodes if "batch_norm" in str(n.target)]
    assert bn and all(n.args[5] is False for n in bn) and drop[0].args[2] is True


# ---- artifact in a fresh process -----------------------------------------------------------------


def test_exported_int8_reloads_in_a_fresh_process(tmp_path):
    seed_everything(0)
    train, val = _loaders(n=128)
    model = _model()
    qat = QuantizationAwareTraining()
    _trainer(tmp_path, [qat], max_epochs=1).fit(model, datamodule=LoaderData(train, val))
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
        m = torch.export.load({str(qat.export_path)!r}).module()
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
    pred = predict_with_program(qat.export_path, x.split(4))
    assert torch.equal(pred["pred"], expected.argmax(-1))


# ---- resume, DDP, sparsity -----------------------------------------------------------------------


def test_mid_qat_resume_matches_an_uninterrupted_run(tmp_path):
    def fit(epochs: int, ckpt_path=None, folder="run") -> ImageClassifier:
        seed_everything(0)
        train, val = _loaders(n=96, shuffle=False)
        model = _model()
        ckpt = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=0)
        qat = QuantizationAwareTraining(freeze_observers_epoch=1, export=False, evaluate_int8=False)
        trainer = _trainer(tmp_path / folder, [qat, ckpt], max_epochs=epochs, enable_checkpointing=True)
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


DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from lightning import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from tests.helpers import LoaderData
from tests.test_qat import _loaders, _model
from project.callbacks.qat import QuantizationAwareTraining

seed_everything(0)
train, val = _loaders(n=128)
model = _model()
qat = QuantizationAwareTraining()
trainer = Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[qat],
                  logger=CSVLogger({out!r}), enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, enable_checkpointing=False)
trainer.fit(model, datamodule=LoaderData(train, val))
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
scales = torch.cat([b.flatten() for n, b in model.named_buffers() if n.endswith(".scale")])
result = {{"rank": trainer.global_rank, "sum": float(flat.double().sum()), "scales": scales.tolist(),
          "acc": float(trainer.callback_metrics["val/acc"]), "acc_int8": float(trainer.callback_metrics["val/acc_int8"]),
          "export": str(qat.export_path)}}
with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump(result, f)
"""


def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_qat.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["sum"] == pytest.approx(r1["sum"], abs=1e-6)  # gradients were synchronized
    assert r0["scales"] == pytest.approx(r1["scales"])  # observers too (buffers broadcast)
    assert r0["acc"] > 0.8 and r0["acc_int8"] > 0.8 and r0["acc_int8"] == r1["acc_int8"]
    assert Path(r0["export"]).is_file()


def test_pruned_weights_stay_zero_through_qat_and_int8(tmp_path):
    seed_everything(0)
    train, val = _loaders(n=128)
    model = _model()
    masked = 0
    with torch.no_grad():  # stand-in for a pruned checkpoint: half of each weight matrix set to zero
        for name, p in model.net.named_parameters():
            if p.dim() > 1:
                mask = torch.rand_like(p) < 0.5
                p[mask] = 0
                masked += int(mask.sum())
    qat = QuantizationAwareTraining()
    _trainer(tmp_path, [qat], max_epochs=1).fit(model, datamodule=LoaderData(train, val))
    zeros = sum(int((p == 0).sum()) for p in model.net.parameters() if p.dim() > 1)
    assert zeros >= masked
    int8 = load_program(qat.export_path)
    int8_zeros = sum(int((b == 0).sum()) for b in int8.buffers() if b.dtype == torch.int8)
    assert int8_zeros >= masked


# ---- bad input ------------------------------------------------------------------------------------


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        return y if y.sum() > 0 else -y  # data-dependent control flow: not exportable


class _NoWeights(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4].relu()


@pytest.mark.parametrize("net", [_Branchy(), _NoWeights()], ids=["not-exportable", "nothing-to-quantize"])
def test_unsupported_architecture_is_one_line_error(net):
    with pytest.raises(UserError, match="QAT cannot handle") as err:
        Q.prepare_qat(net, (1, 28, 28))
    assert "\n" not in str(err.value)


def test_qat_on_prepared_or_converted_model_is_refused(tmp_path):
    prepared = Q.prepare_qat(build_network("lenet5", 4, 1, 28), (1, 28, 28))
    prepared(torch.randn(2, 1, 28, 28))
    with pytest.raises(UserError, match="already prepared"):
        Q.prepare_qat(prepared, (1, 28, 28))
    with pytest.raises(UserError, match="already converted"):
        Q.prepare_qat(Q.convert_copy(prepared), (1, 28, 28))
    model = _model()
    trainer = _trainer(tmp_path, [QuantizationAwareTraining(), QuantizationAwareTraining()], max_epochs=1)
    train, val = _loaders(n=32)
    with pytest.raises(UserError, match="already prepared"):
        trainer.fit(model, datamodule=LoaderData(train, val))


def test_bad_schedule_and_old_torchao_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="freeze_observers_epoch"):
        QuantizationAwareTraining(start_epoch=2, freeze_observers_epoch=2)
    with pytest.raises(UserError, match="start_epoch"):
        QuantizationAwareTraining(start_epoch=-1)
    train, val = _loaders(n=32)
    with pytest.raises(UserError, match="never run"):
        _trainer(tmp_path, [QuantizationAwareTraining(start_epoch=3)], max_epochs=3).fit(_model(), datamodule=LoaderData(train, val))
    import torchao

    monkeypatch.setattr(torchao, "__version__", "0.17.1")
    with pytest.raises(UserError, match=r"torchao >= 0\.18"):
        QuantizationAwareTraining()
