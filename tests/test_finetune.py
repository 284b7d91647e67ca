"""Fine-tuning: ``init_from`` (checkpoints, state_dicts, torchvision weights, clear errors), the
``FreezeSchedule`` callback (frozen stays bit-identical, phases unfreeze at their epoch and LR,
mid-schedule resume), ``backbone_lr_factor``, and the split-MNIST configs through the CLI."""

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from lightning import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from project.callbacks.freezing import FreezeSchedule, Phase
from project.errors import UserError
from project.tasks import ImageClassifier, WarmupCosineLR
from tests.conftest import REPO

CNN = {"arch": "cnn", "arch_kwargs": {"channels": [4, 8], "hidden": 16}, "in_channels": 1, "image_size": 8}


class Blobs(LightningDataModule):
    """Learnable random data: class-dependent mean + noise, 1x8x8, no shuffling (runs are reproducible)."""

    def __init__(self, num_classes: int = 3, n: int = 96, batch_size: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % num_classes
        self.x = torch.randn(n, 1, 8, 8, generator=g) + self.y.view(-1, 1, 1, 1).float()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:32], self.y[:32]), batch_size=32)


def _model(num_classes: int = 3, lr: float = 0.1, **kwargs) -> ImageClassifier:
    return ImageClassifier(num_classes=num_classes, **{**CNN, "optimizer": partial(torch.optim.SGD, lr=lr, momentum=0.9), **kwargs})


def _trainer(tmp_path: Path, callbacks: list, max_epochs: int, **kwargs) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(
        max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=3, **kwargs,
    )


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---- init_from -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet_ckpt(tmp_path_factory) -> Path:
    """A real Lightning checkpoint of a 5-class LeNet-5 (28x28), trained for a few steps."""
    root = tmp_path_factory.mktemp("pretrain")
    model = ImageClassifier(num_classes=5, arch="lenet5")
    data = TensorDataset(torch.randn(16, 1, 28, 28), torch.arange(16) % 5)
    trainer = _trainer(root, [], 1, limit_val_batches=0)
    trainer.fit(model, DataLoader(data, batch_size=8))
    trainer.save_checkpoint(root / "pre.ckpt")
    return root / "pre.ckpt"


def test_init_from_checkpoint_loads_backbone_and_recreates_head(lenet_ckpt) -> None:
    source = torch.load(lenet_ckpt, weights_only=True)["state_dict"]
    model = ImageClassifier(num_classes=3, arch="lenet5", init_from=str(lenet_ckpt))
    for key, value in model.net.backbone.state_dict().items():
        assert torch.equal(value, source[f"net.backbone.{key}"]), key
    assert model.net.head.weight.shape == (3, 84)
    summary = model.init_summary
    assert sorted(summary.reinitialised) == ["head.bias", "head.weight"]
    assert sorted(summary.skipped) == ["head.bias", "head.weight"]
    assert len(summary.loaded) == len(model.net.backbone.state_dict())
    assert "init_from" not in model.hparams  # a checkpoint of the fine-tuned run rebuilds without the source

    same = ImageClassifier(num_classes=5, arch="lenet5", init_from=str(lenet_ckpt))
    assert torch.equal(same.net.head.weight, source["net.head.weight"]) and not same.init_summary.reinitialised
    fresh = ImageClassifier(num_classes=5, arch="lenet5", init_from=str(lenet_ckpt), reset_head=True)
    assert not torch.equal(fresh.net.head.weight, source["net.head.weight"])
    assert sorted(fresh.init_summary.reinitialised) == sorted(fresh.init_summary.skipped) == ["head.bias", "head.weight"]


def test_init_from_plain_state_dict(lenet_ckpt, tmp_path) -> None:
    model = ImageClassifier(num_classes=5, arch="lenet5", init_from=str(lenet_ckpt))
    torch.save(model.net.state_dict(), tmp_path / "net.pt")  # keys backbone.* / head.*, no "net." prefix
    again = ImageClassifier(num_classes=5, arch="lenet5", init_from=str(tmp_path / "net.pt"))
    for (k, a), b in zip(model.net.state_dict().items(), again.net.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_init_from_torchvision_state_dict(stem, tmp_path) -> None:
    tv = torchvision.models.resnet18()  # offline stand-in for ResNet18_Weights.IMAGENET1K_V1
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    model = ImageClassifier(num_classes=10, arch="resnet18", in_channels=3, image_size=32,
                            arch_kwargs={"stem": stem}, init_from=str(tmp_path / "resnet18.pth"))
    backbone = model.net.backbone
    assert torch.equal(backbone.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    assert torch.equal(backbone.bn1.running_var, tv.bn1.running_var)
    summary = model.init_summary
    stem_reinit = ["backbone.conv1.weight"] if stem == "cifar" else []
    assert sorted(summary.reinitialised) == stem_reinit + ["head.bias", "head.weight"]
    assert set(summary.skipped) == {"head.weight", "head.bias", *stem_reinit}  # the 1000-class fc
    assert torch.equal(backbone.conv1.weight, tv.conv1.weight) == (stem == "imagenet")


def test_torchvision_weights_name_offline_is_one_line_error(monkeypatch) -> None:
    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(UserError) as err:
        ImageClassifier(num_classes=10, arch="resnet18", in_channels=3, image_size=32, init_from="IMAGENET1K_V1")
    assert "could not download" in _one_line(err) and "--model.init_from" in str(err.value)
    with pytest.raises(UserError) as err:
        ImageClassifier(num_classes=10, arch="resnet18", in_channels=3, image_size=32, init_from="IMAGENET_V9")
    assert "IMAGENET1K_V1" in _one_line(err)  # lists the valid names
    with pytest.raises(UserError) as err:
        ImageClassifier(num_classes=10, arch="lenet5", init_from="IMAGENET1K_V1")
    assert "resnet18" in _one_line(err)


def test_init_from_wrong_architecture_or_missing_file(lenet_ckpt, tmp_path) -> None:
    with pytest.raises(UserError) as err:
        ImageClassifier(num_classes=3, **CNN, init_from=str(lenet_ckpt))
    message = _one_line(err)
    assert "does not fit" in message and "backbone.features.0.weight" in message and "missing" in message
    with pytest.raises(UserError) as err:  # same module names, other shapes (LeNet-5 for 32x32 images)
        ImageClassifier(num_classes=3, arch="lenet5", image_size=32, init_from=str(lenet_ckpt))
    assert "shape mismatch" in _one_line(err) and "backbone.fc.0.weight" in str(err.value)
    with pytest.raises(UserError) as err:
        ImageClassifier(num_classes=3, arch="lenet5", init_from=str(tmp_path / "nope" / "best.ckpt"))
    assert "no such file" in _one_line(err)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as err:
        ImageClassifier(num_classes=3, arch="lenet5", init_from=str(tmp_path / "junk.ckpt"))
    assert "weights_only=True" in _one_line(err)


# ---- backbone_lr_factor ------------------------------------------------------------------------------


def test_backbone_lr_factor_makes_two_groups_that_the_schedule_keeps() -> None:
    model = _model(backbone_lr_factor=0.1, lr_scheduler=partial(WarmupCosineLR, total_steps=10))
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    head, backbone = optimizer.param_groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.net.backbone.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in model.net.head.parameters()}
    assert scheduler.base_lrs == pytest.approx([0.1, 0.01])
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert backbone["lr"] == pytest.approx(head["lr"] * 0.1)
    with pytest.raises(UserError):
        _model(backbone_lr_factor=0.0)


# ---- FreezeSchedule ----------------------------------------------------------------------------------


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
    _trainer(tmp_path, [FreezeSchedule.linear_probe(), check], max_epochs=2).fit(model, Blobs())
    assert check.checked == 6
    after = model.net.state_dict()
    for key, value in before.items():
        if key.startswith("backbone."):
            assert torch.equal(after[key], value), key  # weights and BN running statistics
    assert not torch.equal(after["head.weight"], before["head.weight"])


def test_train_bn_true_trains_batchnorm_inside_frozen_modules(tmp_path) -> None:
    model = _model()
    before = _snapshot(model.net)
    _trainer(tmp_path, [FreezeSchedule(train_bn=True)], max_epochs=1).fit(model, Blobs())
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
    _trainer(tmp_path, [FreezeSchedule(phases=SCHEDULE), record], max_epochs=4).fit(model, Blobs())
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
        trainer = _trainer(root, [FreezeSchedule(phases=SCHEDULE), record, ckpt], max_epochs, enable_checkpointing=True)
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


# ---- the split-MNIST configs through the CLI -----------------------------------------------------------


def test_split_mnist_configs_pretrain_then_finetune(fake_mnist_dir, tmp_path, monkeypatch) -> None:
    from project.cli import ProjectCLI, main

    monkeypatch.chdir(tmp_path)
    configs = REPO / "configs" / "finetune"
    quick = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.limit_train_batches=2",
             "--test_after_fit=false", f"--data.data_dir={fake_mnist_dir}"]
    main(["fit", f"--config={configs / 'mnist_split_pretrain.yaml'}", "--trainer.max_epochs=1", "--data.val_size=64", *quick])
    best = tmp_path / "lightning_logs" / "mnist_split_pretrain" / "version_0" / "checkpoints" / "best.ckpt"
    assert best.is_file()

    cli = ProjectCLI(args=["fit", f"--config={configs / 'mnist_split_finetune.yaml'}", "--trainer.max_epochs=2", *quick])
    model = cli.model
    summary = model.init_summary  # from the config's default path; the old 5-digit head is not reused
    assert summary is not None and len(summary.loaded) == 8 and sorted(summary.reinitialised) == ["head.bias", "head.weight"]
    schedule = next(c for c in cli.trainer.callbacks if isinstance(c, FreezeSchedule))
    assert schedule.frozen == ["net.backbone.features"] and schedule.phases == []
    source = torch.load(best, weights_only=True)["state_dict"]
    backbone = model.net.backbone
    assert torch.equal(backbone.features[0].weight, source["net.backbone.features.0.weight"])  # frozen all run
    assert not torch.equal(backbone.fc[0].weight, source["net.backbone.fc.0.weight"])  # trained

    # a schedule with phases, written in YAML and composed over the config
    (tmp_path / "phases.yaml").write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: project.callbacks.freezing.FreezeSchedule\n"
        "      init_args:\n"
        "        frozen: [net.backbone]\n"
        "        phases:\n"
        "          - {epoch: 1, modules: [net.backbone.fc], lr: 0.001}\n"
        "          - {epoch: 2, modules: ['net\\.backbone\\.features\\.[03]'], lr_factor: 0.1}\n"
    )
    cli = ProjectCLI(args=["fit", f"--config={configs / 'mnist_split_finetune.yaml'}", f"--config={tmp_path / 'phases.yaml'}",
                           "--trainer.max_epochs=3", *quick])
    schedule = next(c for c in cli.trainer.callbacks if isinstance(c, FreezeSchedule))
    assert schedule.phases == [Phase(1, ["net.backbone.fc"], lr=0.001), Phase(2, [r"net\.backbone\.features\.[03]"], lr_factor=0.1)]
    assert schedule.applied == [0, 1]
    assert [g["lr"] for g in cli.trainer.optimizers[0].param_groups] == pytest.approx([0.003, 0.001, 0.0003])

def test_every_finetune_config_stops_early_on_val_acc() -> None:
    for config in sorted((REPO / "configs" / "finetune").glob("*.yaml")):
        callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
        stops = [c["init_args"] for c in callbacks if c["class_path"].endswith("EarlyStopping")]
        assert stops and stops[0]["monitor"] == "val/acc" and stops[0]["mode"] == "max", config.name

def test_cli_init_from_missing_file_is_one_line_error(fake_mnist_dir, tmp_path, monkeypatch, capsys) -> None:
    from project.cli import main

    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "finetune" / "mnist_split_finetune.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={config}", "--model.init_from=runs/missing.ckpt", f"--data.data_dir={fake_mnist_dir}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: init_from runs/missing.ckpt: no such file"), err
