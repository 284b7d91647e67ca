"""Starting from other weights (``init_from``: Lightning checkpoints, plain state_dicts, torchvision weights,
clear errors) and the backbone's own LR (``backbone_lr_factor``)."""

from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from project.errors import UserError
from project.tasks import ImageClassifier, WarmupCosineLR
from tests.toys import SGD_MOMENTUM, TINY_CNN, cpu_trainer, toy_classifier


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
    trainer = cpu_trainer(root, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
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
        ImageClassifier(num_classes=3, **TINY_CNN, init_from=str(lenet_ckpt))
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
    model = toy_classifier(3, **TINY_CNN, optimizer=SGD_MOMENTUM, backbone_lr_factor=0.1,
                           lr_scheduler=partial(WarmupCosineLR, total_steps=10))
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
        toy_classifier(3, **TINY_CNN, optimizer=SGD_MOMENTUM, backbone_lr_factor=0.0)
