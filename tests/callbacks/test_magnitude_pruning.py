"""The MagnitudePruning callback: schedule, masks that hold in training, checkpoints and exported weights,
mid-schedule resume, DDP, order with QAT; bad arguments and configurations of both pruning callbacks."""

import csv
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from project.callbacks.channel_pruning import ChannelPruning
from project.callbacks.magnitude_pruning import MagnitudePruning
from project.compression.sparsity import cubic_sparsity
from project.errors import UserError
from project.fit_artifacts import write_fit_artifacts
from project.tasks import ImageClassifier
from tests.conftest import run_python
from tests.toys import PatternedData, cpu_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_CNN = {"channels": [8, 16], "hidden": 32}

# Lightning's default logger (TensorBoard under tmp_path) and checkpointing, every step logged
make_trainer = partial(cpu_trainer, logger=True, enable_checkpointing=True, log_every_n_steps=1)


def sgd_momentum(params):
    # Momentum and weight decay would move a pruned weight off zero if the masks were not enforced.
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


class ZeroWatch(Callback):
    """Records the sparsity of every masked tensor before each batch and checks masked entries are 0."""

    def __init__(self, pruner: MagnitudePruning) -> None:
        self.pruner = pruner
        self.seen: dict[int, dict[str, float]] = {}
        self.violations = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for name, mask in self.pruner.masks.items():
            p = pl_module.get_parameter(name)
            self.violations += int((p.detach()[~mask] != 0).sum())
        self.seen[trainer.global_step] = {
            name: int((pl_module.get_parameter(name) == 0).sum()) for name in self.pruner.masks
        }


def test_sparsity_follows_schedule_zeros_stay_zero_biases_and_batchnorm_untouched(tmp_path):
    L.seed_everything(0)
    model = ImageClassifier(10, 1, 28, arch="cnn", arch_kwargs=SMALL_CNN, optimizer=sgd_momentum)
    pruner = MagnitudePruning(amount=0.8, start=2, end=8, frequency=2, unit="step", scope="layer")
    watch = ZeroWatch(pruner)
    logger = CSVLogger(tmp_path, name="csv")
    make_trainer(tmp_path, [pruner, watch], max_steps=14, limit_val_batches=1, logger=logger).fit(model, PatternedData())

    expected_names = {"net.backbone.features.0.weight", "net.backbone.features.4.weight",
                      "net.backbone.fc.0.weight", "net.head.weight"}
    assert set(pruner.masks) == expected_names  # weights of conv/linear only
    assert [h["step"] for h in pruner.history] == [2, 4, 6, 8]
    for step, per_layer in watch.seen.items():
        last_point = max([p for p in (2, 4, 6, 8) if p <= step], default=None)
        target = 0.0 if last_point is None else cubic_sparsity(last_point, 2, 8, 0.8)
        for name, zeros in per_layer.items():
            assert zeros == round(target * model.get_parameter(name).numel()), (step, name)
    assert watch.violations == 0  # pruned weights were exactly zero at every later forward pass
    for name, p in model.named_parameters():
        if name not in expected_names:  # biases and BatchNorm: trained, never zeroed
            assert int((p == 0).sum()) == 0, name
    for name, mask in pruner.masks.items():
        assert torch.equal(model.get_parameter(name) == 0, ~mask)
    # The logger got the global and per-layer sparsity at each pruning step.
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [(int(r["step"]), float(r["pruning/sparsity"])) for r in rows if r.get("pruning/sparsity")]
    assert [step for step, _ in logged] == [2, 4, 6, 8] and logged[-1][1] == pytest.approx(0.8, abs=1e-3)
    # per layer under the network's own names, the scheme TensorBoardViews logs them in
    assert all(r.get("sparsity/head.weight") for r in rows if r.get("pruning/sparsity"))
    assert not any(k.startswith("sparsity/net.") or k == "sparsity/global" for k in rows[0])


def test_checkpoint_and_exported_program_keep_the_zeros_in_a_fresh_process(tmp_path):
    L.seed_everything(1)
    model = ImageClassifier(10, 1, 28, arch="lenet5")
    pruner = MagnitudePruning(amount=0.9, start=1, unit="epoch")  # one-shot at the start of epoch 1
    best = ModelCheckpoint(dirpath=tmp_path / "best", filename="best", monitor="val/acc", mode="max")
    final = ModelCheckpoint(dirpath=tmp_path / "final", filename="final", monitor=None)
    trainer = make_trainer(tmp_path, [pruner, best, final], max_epochs=3, limit_train_batches=4)
    trainer.fit(model, PatternedData())
    assert pruner.history[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    # The best checkpoint is a pruned one even if the dense epoch 0 scored higher, and the dense one is gone.
    assert torch.load(best.best_model_path, weights_only=True)["epoch"] >= 1
    assert [p.name for p in (tmp_path / "best").iterdir()] == [Path(best.best_model_path).name]
    x = torch.randn(4, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    expected = model.net.eval()(x)
    program = write_fit_artifacts(trainer, model, ["torch"])["torch"]  # what fit's --export writes
    assert program == Path(trainer.log_dir) / "model.pt2"
    result = run_python(
        f"""
        import json, torch
        from project.models import build_network
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        state = torch.load({str(tmp_path / 'final' / 'final.ckpt')!r}, weights_only=True)
        state = {{k[4:]: v for k, v in state["state_dict"].items() if k.startswith("net.")}}
        net = build_network("lenet5", 10, 1, 28)  # never pruned
        net.load_state_dict(state, strict=True)
        ws = [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        out = {{"ckpt": {{"sparsity": sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws),
                          "keys": sorted(state), "y": net.eval()(x).tolist()}}}}
        exported = torch.export.load({str(program)!r})  # PatternedData's mean 0, std 1: x is what it takes
        ws = [v for k, v in exported.state_dict.items() if k.endswith("weight") and v.dim() > 1]
        out["program"] = {{"sparsity": sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws),
                           "keys": sorted(exported.state_dict), "y": exported.module()(x).tolist()}}
        print(json.dumps(out))
        """,
        tmp_path,
    )
    for name in ("ckpt", "program"):
        assert result[name]["sparsity"] == pytest.approx(0.9, abs=1e-4)
        assert not any("_orig" in k or "_mask" in k for k in result[name]["keys"])
        assert torch.allclose(torch.tensor(result[name]["y"]), expected, atol=1e-5)


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


class RestoreWatch(Callback):
    def __init__(self, pruner: MagnitudePruning) -> None:
        self.pruner = pruner
        self.at_start: dict = {}

    def on_train_start(self, trainer, pl_module):
        self.at_start = {
            "last_point": self.pruner.last_point,
            "masks": {k: v.clone() for k, v in self.pruner.masks.items()},
            "zeros_ok": all(bool((pl_module.get_parameter(k)[~m] == 0).all()) for k, m in self.pruner.masks.items()),
            "epoch": trainer.current_epoch,
        }


def test_mid_schedule_resume_restores_masks_and_schedule_position(tmp_path):
    L.seed_everything(2)
    schedule = dict(amount=0.75, start=1, end=3, frequency=1, unit="epoch", scope="global")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, monitor=None)
    first = MagnitudePruning(**schedule)
    trainer = make_trainer(tmp_path, [first, ckpt, StopAfterEpoch(1)], max_epochs=5, limit_train_batches=3,
                           limit_val_batches=1, logger=False)
    with pytest.warns(UserWarning, match="before its last step"):  # the run was cut mid-schedule
        trainer.fit(ImageClassifier(10, 1, 28, arch="lenet5"), PatternedData())
    mid = tmp_path / "ckpt" / "epoch=1.ckpt"  # taken after the pruning step of epoch 1, before those of 2 and 3
    state = torch.load(mid, weights_only=True)["callbacks"][first.state_key]
    assert state["last_point"] == 1 and state["masks"]

    resumed = MagnitudePruning(**schedule)
    watch = RestoreWatch(resumed)
    model = ImageClassifier(10, 1, 28, arch="lenet5")
    trainer = make_trainer(tmp_path, [resumed, watch], max_epochs=5, limit_train_batches=3, limit_val_batches=1,
                           logger=False)
    trainer.fit(model, PatternedData(), ckpt_path=mid)
    assert watch.at_start["epoch"] == 2 and watch.at_start["last_point"] == 1 and watch.at_start["zeros_ok"]
    for name, mask in state["masks"].items():
        assert torch.equal(watch.at_start["masks"][name], mask)
        assert not resumed.masks[name][~mask].any()  # what was pruned stays pruned
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]  # the history came back, steps 2, 3 ran once
    assert resumed.history[1]["target"] == pytest.approx(cubic_sparsity(2, 1, 3, 0.75))
    assert resumed.history[-1]["sparsity"] == pytest.approx(0.75, abs=1e-4)


class RankDump(Callback):
    def __init__(self, pruner: MagnitudePruning, folder: Path) -> None:
        self.pruner, self.folder = pruner, folder

    def on_train_end(self, trainer, pl_module):
        zeros = {k: pl_module.get_parameter(k).detach() == 0 for k in self.pruner.masks}
        torch.save({"masks": self.pruner.masks, "zeros": zeros}, self.folder / f"rank{trainer.global_rank}.pt")

    def teardown(self, trainer, pl_module, stage):
        # the spawned worker's last collective: nothing left for gloo's threads to free as the worker exits
        # (project.runtime.finish_distributed says why)
        trainer.strategy.barrier("end")


def test_ddp_two_cpu_processes_end_with_identical_masks(tmp_path):
    L.seed_everything(3)
    pruner = MagnitudePruning(amount=0.7, start=0, end=4, frequency=2, unit="step")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor=None)
    trainer = make_trainer(
        tmp_path, [pruner, RankDump(pruner, tmp_path), ckpt], strategy="ddp_spawn", devices=2, max_steps=6,
        limit_val_batches=1,
    )
    trainer.fit(ImageClassifier(10, 1, 28, arch="lenet5"), PatternedData(n_train=384))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    saved_masks = state["callbacks"][pruner.state_key]["masks"]
    assert set(r0["masks"]) == set(r1["masks"]) == set(saved_masks) and saved_masks
    for name in saved_masks:
        assert torch.equal(r0["masks"][name], r1["masks"][name])
        assert torch.equal(r0["zeros"][name], r1["zeros"][name])
        assert torch.equal(state["state_dict"][name] == 0, ~saved_masks[name])
    total = sum(m.numel() for m in saved_masks.values())
    assert sum(int((~m).sum()) for m in saved_masks.values()) / total == pytest.approx(0.7, abs=1e-4)


def test_pruning_listed_before_qat_keeps_zeros_through_fake_quantized_training(tmp_path):
    from project.callbacks.qat import QuantizationAwareTraining

    L.seed_everything(6)
    model = ImageClassifier(10, 1, 28, arch="lenet5", optimizer=sgd_momentum)
    pruner = MagnitudePruning(amount=0.8, start=0, unit="epoch")
    qat = QuantizationAwareTraining(evaluate_int8=False)
    trainer = make_trainer(tmp_path, [pruner, qat], max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                           logger=False, enable_checkpointing=False)
    trainer.fit(model, PatternedData())
    assert isinstance(model.net, torch.fx.GraphModule)  # QAT's prepared network trained with the masks
    for name, mask in pruner.masks.items():
        assert torch.equal(model.get_parameter(name) == 0, ~mask), name
    assert pruner.history[-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)


def test_pruning_listed_after_qat_is_a_clear_error(tmp_path):
    from project.callbacks.qat import QuantizationAwareTraining

    qat = QuantizationAwareTraining(evaluate_int8=False)
    trainer = make_trainer(tmp_path, [qat, MagnitudePruning(amount=0.5)], max_epochs=1, logger=False)
    with pytest.raises(UserError, match="before QuantizationAwareTraining"):
        trainer.fit(ImageClassifier(10, 1, 28, arch="lenet5"), PatternedData())


# ---- bad input (both pruning callbacks) ------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: MagnitudePruning(amount=1.0),
        lambda: MagnitudePruning(amount=-0.1),
        lambda: MagnitudePruning(amount=0.5, start=5, end=2),
        lambda: MagnitudePruning(amount=0.5, frequency=0),
        lambda: MagnitudePruning(amount=0.5, initial_sparsity=0.6),
        lambda: ChannelPruning(amount=1.2),
        lambda: ChannelPruning(norm=3),
    ],
)
def test_bad_arguments_fail_at_construction(make):
    with pytest.raises(UserError):
        make()


class StepCounter(Callback):
    steps = 0

    def on_train_batch_start(self, *args):
        StepCounter.steps += 1


@pytest.mark.parametrize(
    "callback, message",
    [
        (MagnitudePruning(amount=0.5, include="no_such_layer"), "matches"),
        (MagnitudePruning(amount=0.5, module_types=["Conv3d"]), "matches"),
        (MagnitudePruning(amount=0.5, module_types=["NotALayer"]), "torch.nn"),
        (MagnitudePruning(amount=0.5, start=1, end=4), "training stops"),
        (ChannelPruning(module_types=["BatchNorm2d"]), "Conv2d/Linear"),
        (ChannelPruning(include="head"), "head"),
    ],
)
def test_bad_configuration_fails_at_setup_before_training(tmp_path, callback, message):
    StepCounter.steps = 0
    trainer = make_trainer(tmp_path, [callback, StepCounter()], max_epochs=3, logger=False)
    with pytest.raises(UserError, match=message):
        trainer.fit(ImageClassifier(10, 1, 28, arch="cnn"), PatternedData())
    assert StepCounter.steps == 0
