"""The ``FreezeSchedule`` callback: frozen stays bit-identical, phases unfreeze at their epoch and LR,
mid-schedule resume."""

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from project.callbacks.freezing import FreezeSchedule, Phase
from project.errors import UserError
from project.tasks import WarmupCosineLR
from tests.toys import SGD_MOMENTUM, TINY_CNN, Blobs, cpu_trainer, toy_classifier

_model = partial(toy_classifier, 3, **TINY_CNN, optimizer=SGD_MOMENTUM)  # a 3-class tiny CNN for Blobs


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class AssertNoBackboneGrad(Callback):
    """After every backward: the frozen backbone got no gradient, and its BatchNorm layers were in eval mode."""

    def __init__(self) -> None:
        self.checked = 0

    def on_after_backward(self, trainer, pl_module) -> None:
        assert all(p.grad is None for p in pl_module.net.backbone.parameters())
        assert all(not m.training for m in pl_module.net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert pl_module.net.head.weight.grad is not None
        self.checked += 1


def test_linear_probe_keeps_backbone_and_bn_statistics_bit_identical(tmp_path) -> None:
    model = _model()
    before = _snapshot(model.net)
    check = AssertNoBackboneGrad()
    trainer = cpu_trainer(tmp_path, [FreezeSchedule.linear_probe(), check], max_epochs=2, limit_train_batches=3)
    trainer.fit(model, Blobs())
    assert check.checked == 6
    after = model.net.state_dict()
    for key, value in before.items():
        if key.startswith("backbone."):
            assert torch.equal(after[key], value), key  # weights and BN running statistics
    assert not torch.equal(after["head.weight"], before["head.weight"])


def test_train_bn_true_trains_batchnorm_inside_frozen_modules(tmp_path) -> None:
    model = _model()
    before = _snapshot(model.net)
    cpu_trainer(tmp_path, [FreezeSchedule(train_bn=True)], max_epochs=1, limit_train_batches=3).fit(model, Blobs())
    after = model.net.state_dict()
    assert torch.equal(after["backbone.features.0.weight"], before["backbone.features.0.weight"])  # conv frozen
    assert not torch.equal(after["backbone.features.1.running_mean"], before["backbone.features.1.running_mean"])
    assert not torch.equal(after["backbone.features.1.weight"], before["backbone.features.1.weight"])


class Record(Callback):
    """Per epoch, after FreezeSchedule ran: param groups (names, LR) and which parameters are trainable."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict] = {}

    @staticmethod
    def state(trainer, pl_module) -> dict:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        optimizer = trainer.optimizers[0]
        return {
            "groups": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
            "lrs": [g["lr"] for g in optimizer.param_groups],
            "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad),
            "weights": _snapshot(pl_module.net),
            "optimizer": copy.deepcopy(optimizer.state_dict()),  # live buffers change in place
        }

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.state(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs[trainer.current_epoch] = self.state(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = self.state(trainer, pl_module)


SCHEDULE = [
    {"epoch": 1, "modules": ["net.backbone.fc"], "lr_factor": 0.5},
    {"epoch": 3, "modules": [r"net\.backbone\.features\.[0-9]+"], "lr": 0.002},
]


def test_phases_unfreeze_at_their_epoch_with_their_lr(tmp_path) -> None:
    model, record = _model(), Record()
    initial = _snapshot(model.net)
    trainer = cpu_trainer(tmp_path, [FreezeSchedule(phases=SCHEDULE), record], max_epochs=4, limit_train_batches=3)
    trainer.fit(model, Blobs())
    head = ["net.head.bias", "net.head.weight"]
    fc = ["net.backbone.fc.0.bias", "net.backbone.fc.0.weight"]
    e = record.epochs
    assert e[0]["trainable"] == head and e[0]["lrs"] == [0.1]
    assert e[1]["trainable"] == sorted(fc + head) and e[1]["lrs"] == pytest.approx([0.1, 0.05])
    assert sorted(e[1]["groups"][1]) == fc
    assert e[2]["lrs"] == pytest.approx([0.1, 0.05])
    assert e[3]["lrs"] == pytest.approx([0.1, 0.05, 0.002])
    assert len(e[3]["trainable"]) == len(list(model.parameters()))
    # frozen means untouched: fc only moves from epoch 1, the convs and BN only from epoch 3
    assert torch.equal(e[1]["weights"]["backbone.fc.0.weight"], initial["backbone.fc.0.weight"])
    assert not torch.equal(e[2]["weights"]["backbone.fc.0.weight"], initial["backbone.fc.0.weight"])
    for key in ("features.0.weight", "features.1.weight", "features.1.running_mean", "features.5.running_var"):
        assert torch.equal(e[3]["weights"][f"backbone.{key}"], initial[f"backbone.{key}"]), key
        assert not torch.equal(record.end["weights"][f"backbone.{key}"], initial[f"backbone.{key}"]), key


def test_unfreeze_at_epoch_preset_and_bad_schedules() -> None:
    preset = FreezeSchedule.unfreeze_later(2, lr_factor=0.2)
    assert preset.phases == [Phase(epoch=2, modules=["net.backbone"], lr_factor=0.2)]
    with pytest.raises(UserError):
        FreezeSchedule(phases=[{"epoch": 1, "modules": ["net.backbone"], "lr": 0.1, "lr_factor": 0.1}])
    with pytest.raises(UserError):
        FreezeSchedule(phases=SCHEDULE, unfreeze_at_epoch=1)
    model = _model()
    with pytest.raises(UserError, match="matches no module"):
        FreezeSchedule(frozen=["net.bakbone"]).freeze_before_training(model)
    with pytest.raises(UserError, match="not inside frozen"):
        FreezeSchedule(frozen=["net.backbone.fc"], phases=[{"epoch": 1, "modules": ["net.head"]}]).freeze_before_training(model)


@pytest.mark.parametrize("with_scheduler", [False, True], ids=["constant_lr", "cosine_schedule"])
def test_resume_mid_schedule_restores_trainable_flags_groups_and_lrs(tmp_path, with_scheduler) -> None:
    """Stop after epoch 1 (phase 0 applied, phase 1 not yet), resume from last.ckpt: same state as
    the interrupted run had, phase 1 still applies, and the weights end bit-identical to an uninterrupted run."""
    # the schedule spans the whole 4-epoch run (12 steps) in all three runs
    kwargs = {"lr_scheduler": partial(WarmupCosineLR, warmup_steps=2, total_steps=12)} if with_scheduler else {}

    def run(root: Path, max_epochs: int, ckpt_path: str | None = None) -> Record:
        record = Record()
        ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
        trainer = cpu_trainer(root, [FreezeSchedule(phases=SCHEDULE), record, ckpt], max_epochs=max_epochs,
                              limit_train_batches=3, enable_checkpointing=True)
        torch.manual_seed(0)  # the same initial weights in every run
        trainer.fit(_model(**kwargs), Blobs(), ckpt_path=ckpt_path, weights_only=True)  # as the CLI loads
        return record

    interrupted = run(tmp_path / "a", max_epochs=2)
    resumed = run(tmp_path / "a", max_epochs=4, ckpt_path=str(tmp_path / "a" / "last.ckpt"))
    straight = run(tmp_path / "b", max_epochs=4)

    end, start = interrupted.end, resumed.start
    assert len(start["groups"]) == 2
    assert start["groups"] == end["groups"] and start["trainable"] == end["trainable"]
    assert start["lrs"] == end["lrs"]
    assert start["optimizer"]["param_groups"] == end["optimizer"]["param_groups"]
    for i, state in end["optimizer"]["state"].items():
        assert torch.equal(start["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"])
    assert resumed.epochs[3]["lrs"] == pytest.approx(straight.epochs[3]["lrs"])
    assert resumed.epochs[3]["groups"] == straight.epochs[3]["groups"]
    for key, value in straight.end["weights"].items():
        assert torch.equal(resumed.end["weights"][key], value), key
