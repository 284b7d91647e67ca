"""The ChannelPruning callback: the exported smaller program, resume from its checkpoint, pruning the
weights loaded by init_from, and the optimizer rebuilt when it prunes mid-fit."""

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from project.callbacks.channel_pruning import ChannelPruning
from project.compression import measure
from project.fit_artifacts import write_fit_artifacts
from project.models import build_network
from project.tasks import ImageClassifier
from tests.conftest import run_python
from tests.toys import PatternedData, cpu_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# Lightning's default logger (TensorBoard under tmp_path) and checkpointing, every step logged
make_trainer = partial(cpu_trainer, logger=True, enable_checkpointing=True, log_every_n_steps=1)


def test_channel_pruning_callback_exports_pt2_that_loads_without_project_code_and_resumes(tmp_path):
    L.seed_everything(4)
    model = ImageClassifier(10, 1, 28, arch="cnn")
    dense_params = measure.count_parameters(model.net)
    pruner = ChannelPruning(amount=0.5, norm=2, epoch=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor=None)
    trainer = make_trainer(tmp_path, [pruner, ckpt], max_epochs=1, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(model, PatternedData())
    assert measure.count_parameters(model.net) < 0.5 * dense_params
    artefact = write_fit_artifacts(trainer, model, ["torch"])["torch"]  # what fit's --export writes
    assert artefact == Path(trainer.log_dir) / "model.pt2"
    x = torch.randn(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    expected = model.net.eval()(x)
    result = run_python(
        f"""
        import json, sys, torch
        net = torch.export.load({str(artefact)!r}).module()
        y = net(torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True))
        print(json.dumps({{"y": y.tolist(), "project": any(m.startswith("project") for m in sys.modules)}}))
        """,
        tmp_path,
        project_on_path=False,
    )
    assert not result["project"]
    assert torch.allclose(torch.tensor(result["y"]), expected, atol=1e-5)

    # A fresh, unpruned model tests from the checkpoint: the plan in it rebuilds the shapes first.
    fresh = ImageClassifier(10, 1, 28, arch="cnn")
    tester = make_trainer(
        tmp_path, [ChannelPruning(amount=0.5, norm=2, epoch=0)], logger=False, enable_checkpointing=False
    )
    tester.test(fresh, PatternedData(), ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert measure.count_parameters(fresh.net) == measure.count_parameters(model.net)
    assert torch.allclose(fresh.net.eval()(x), expected, atol=1e-5)


def test_channel_pruning_after_init_from_prunes_the_pretrained_weights(tmp_path):
    torch.manual_seed(7)
    pretrained = build_network("lenet5", 10, 1, 28)
    with torch.no_grad():  # make the ranking unmistakable: channels 3, 4, 5 of conv1 are the strong ones
        pretrained.backbone.features[0].weight[3:] *= 100
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    model = ImageClassifier(10, 1, 28, arch="lenet5", init_from=str(tmp_path / "pretrained.pt"))
    pruner = ChannelPruning(amount=0.5, epoch=0)
    make_trainer(tmp_path, [pruner], max_steps=1, limit_val_batches=0, logger=False,
                 enable_checkpointing=False).fit(model, PatternedData())
    conv1 = next(e for e in pruner.plan if e["layer"] == "backbone.features.0")
    assert conv1["idxs"] == [0, 1, 2]  # the weak channels of the loaded weights went


def test_channel_pruning_mid_fit_rebuilds_the_optimizer(tmp_path):
    L.seed_everything(5)
    model = ImageClassifier(10, 1, 28, arch="lenet5")
    pruner = ChannelPruning(amount=0.5, epoch=1)
    trainer = make_trainer(tmp_path, [pruner], max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, PatternedData())
    assert pruner.pruned and model.net.backbone.features[0].out_channels == 3
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters()}
