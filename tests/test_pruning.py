"""Magnitude (unstructured) and channel (structured) pruning: schedule, masks, checkpoints, DDP, shapes."""

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from project.callbacks.magnitude_pruning import MagnitudePruning
from project.callbacks.channel_pruning import ChannelPruning
from project.compression import measure
from project.compression.sparsity import compute_masks, cubic_sparsity, schedule_points
from project.compression.structured import apply_plan, check_structured_targets, compute_plan, zero_plan
from project.errors import UserError
from project.models import build_network
from project.tasks import ImageClassifier
from tests.fakes import patterned_images

REPO = Path(__file__).resolve().parents[1]
SMALL_CNN = {"channels": [8, 16], "hidden": 32}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead, and far more on a busy machine
    yield
    torch.set_num_threads(threads)


class TinyData(L.LightningDataModule):
    """Learnable 10-class patterned images, already normalised, in plain DataLoaders."""

    mean, std = (0.0,), (1.0,)  # what an exported program applies: nothing, the images are normalised already

    def __init__(self, n_train: int = 256, n_val: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        x, y = patterned_images(n_train + n_val, 10, (1, 28, 28), seed=3)
        self.x = (torch.from_numpy(x).float() / 255 - 0.5) / 0.3
        self.y = torch.from_numpy(y)
        self.n_train, self.batch_size = n_train, batch_size

    def train_dataloader(self) -> DataLoader:
        ds = TensorDataset(self.x[: self.n_train], self.y[: self.n_train])
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[self.n_train :], self.y[self.n_train :]), batch_size=64)

    test_dataloader = val_dataloader


def sgd_momentum(params):
    # Momentum and weight decay would move a pruned weight off zero if the masks were not enforced.
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def make_trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def run_python(code: str, cwd: Path, project_on_path: bool = True) -> dict:
    """Run ``code`` in a fresh interpreter and return the JSON object it prints last."""
    env = {"PYTHONPATH": str(REPO)} if project_on_path else {}
    import os

    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the schedule ---------------------------------------------------------------------------------


def test_cubic_schedule_values():
    assert schedule_points(2, 8, 2) == [2, 4, 6, 8]
    assert schedule_points(0, 5, 2) == [0, 2, 4, 5]
    assert schedule_points(3, 3, 1) == [3]
    assert cubic_sparsity(2, 2, 8, 0.8, 0.1) == pytest.approx(0.1)
    assert cubic_sparsity(5, 2, 8, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(8, 2, 8, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(20, 2, 8, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(1, 2, 8, 0.8) == 0.0
    assert cubic_sparsity(4, 4, 4, 0.9) == 0.9  # one-shot
    values = [cubic_sparsity(t, 0, 10, 0.9) for t in range(11)]
    assert values == sorted(values)


def test_global_masks_rank_all_layers_together_and_only_grow():
    big = torch.linspace(1, 2, 100)  # large weights
    small = torch.linspace(0.01, 0.1, 10)  # all smaller than any of big
    masks = compute_masks({"a": big, "b": small}, 0.1, "global")
    # One threshold: the 11 smallest of the 110 are all 10 of b and the smallest of a.
    assert not masks["b"].any() and int((~masks["a"]).sum()) == 1 and not masks["a"][0]
    masks = compute_masks({"a": big, "b": small}, 0.1, "layer")
    assert int((~masks["a"]).sum()) == 10 and int((~masks["b"]).sum()) == 1
    # A weight pruned before stays pruned even if it has grown since (ranked below everything).
    prev = {"a": torch.ones(100, dtype=torch.bool), "b": torch.ones(10, dtype=torch.bool)}
    prev["a"][-1] = False
    again = compute_masks({"a": big, "b": small}, 0.05, "global", prev)
    assert not again["a"][-1]


# ---- unstructured pruning in training --------------------------------------------------------------


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
    make_trainer(tmp_path, [pruner, watch], max_steps=14, limit_val_batches=1, logger=logger).fit(model, TinyData())

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
    logged = [(int(r["step"]), float(r["sparsity/global"])) for r in rows if r.get("sparsity/global")]
    assert [step for step, _ in logged] == [2, 4, 6, 8] and logged[-1][1] == pytest.approx(0.8, abs=1e-3)
    assert all(r.get("sparsity/net.head.weight") for r in rows if r.get("sparsity/global"))


def test_checkpoint_and_exported_weights_load_into_plain_model_in_fresh_process(tmp_path):
    L.seed_everything(1)
    model = ImageClassifier(10, 1, 28, arch="lenet5")
    pruner = MagnitudePruning(amount=0.9, start=1, unit="epoch")  # one-shot at the start of epoch 1
    best = ModelCheckpoint(dirpath=tmp_path / "best", filename="best", monitor="val/acc", mode="max")
    final = ModelCheckpoint(dirpath=tmp_path / "final", filename="final", monitor=None)
    trainer = make_trainer(tmp_path, [pruner, best, final], max_epochs=3, limit_train_batches=4)
    trainer.fit(model, TinyData())
    assert pruner.history[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    # The best checkpoint is a pruned one even if the dense epoch 0 scored higher, and the dense one is gone.
    assert torch.load(best.best_model_path, weights_only=True)["epoch"] >= 1
    assert [p.name for p in (tmp_path / "best").iterdir()] == [Path(best.best_model_path).name]
    x = torch.randn(4, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    expected = model.net.eval()(x)
    weights = Path(trainer.log_dir) / "pruned_weights.pt"
    assert weights.is_file()
    result = run_python(
        f"""
        import json, torch
        from project.models import build_network
        out = {{}}
        for name, path in [("ckpt", {str(tmp_path / 'final' / 'final.ckpt')!r}), ("weights", {str(weights)!r})]:
            state = torch.load(path, weights_only=True)
            if "state_dict" in state:
                state = {{k[4:]: v for k, v in state["state_dict"].items() if k.startswith("net.")}}
            net = build_network("lenet5", 10, 1, 28)  # never pruned
            net.load_state_dict(state, strict=True)
            ws = [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
            y = net.eval()(torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True))
            out[name] = {{"sparsity": zeros, "keys": sorted(state), "y": y.tolist()}}
        print(json.dumps(out))
        """,
        tmp_path,
    )
    for name in ("ckpt", "weights"):
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
        trainer.fit(ImageClassifier(10, 1, 28, arch="lenet5"), TinyData())
    mid = tmp_path / "ckpt" / "epoch=1.ckpt"  # taken after the pruning step of epoch 1, before those of 2 and 3
    state = torch.load(mid, weights_only=True)["callbacks"][first.state_key]
    assert state["last_point"] == 1 and state["masks"]

    resumed = MagnitudePruning(**schedule)
    watch = RestoreWatch(resumed)
    model = ImageClassifier(10, 1, 28, arch="lenet5")
    trainer = make_trainer(tmp_path, [resumed, watch], max_epochs=5, limit_train_batches=3, limit_val_batches=1,
                           logger=False)
    trainer.fit(model, TinyData(), ckpt_path=mid)
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


def test_ddp_two_cpu_processes_end_with_identical_masks(tmp_path):
    L.seed_everything(3)
    pruner = MagnitudePruning(amount=0.7, start=0, end=4, frequency=2, unit="step")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor=None)
    trainer = make_trainer(
        tmp_path, [pruner, RankDump(pruner, tmp_path), ckpt], strategy="ddp_spawn", devices=2, max_steps=6,
        limit_val_batches=1,
    )
    trainer.fit(ImageClassifier(10, 1, 28, arch="lenet5"), TinyData(n_train=384))
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
    qat = QuantizationAwareTraining(evaluate_int8=False, export=False)
    trainer = make_trainer(tmp_path, [pruner, qat], max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                           logger=False, enable_checkpointing=False)
    trainer.fit(model, TinyData())
    assert isinstance(model.net, torch.fx.GraphModule)  # QAT's prepared network trained with the masks
    for name, mask in pruner.masks.items():
        assert torch.equal(model.get_parameter(name) == 0, ~mask), name
    assert pruner.history[-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)


def test_pruning_listed_after_qat_is_a_clear_error(tmp_path):
    from project.callbacks.qat import QuantizationAwareTraining

    qat = QuantizationAwareTraining(evaluate_int8=False, export=False)
    trainer = make_trainer(tmp_path, [qat, MagnitudePruning(amount=0.5)], max_epochs=1, logger=False)
    with pytest.raises(UserError, match="before QuantizationAwareTraining"):
        trainer.fit(ImageClassifier(10, 1, 28, arch="lenet5"), TinyData())


# ---- structured pruning ---------------------------------------------------------------------------


def _randomise_bn(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)


@pytest.mark.parametrize(
    "arch, kwargs, shape",
    [("lenet5", {}, (1, 28, 28)), ("cnn", {}, (1, 28, 28)), ("resnet9", {"width": 8}, (3, 32, 32))],
)
def test_channel_pruning_gives_fewer_channels_and_matches_masked_model(arch, kwargs, shape):
    torch.manual_seed(0)
    net = build_network(arch, 10, shape[0], shape[1], **kwargs).eval()
    with torch.no_grad():
        _randomise_bn(net)
    ex = torch.randn(1, *shape)
    targets = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "head"]
    plan = compute_plan(net, ex, targets, amount=0.5, norm=1)
    pruned = build_network(arch, 10, shape[0], shape[1], **kwargs)
    pruned.load_state_dict(net.state_dict())
    pruned.eval()
    apply_plan(pruned, plan, ex)
    masked = build_network(arch, 10, shape[0], shape[1], **kwargs)
    masked.load_state_dict(net.state_dict())
    masked.eval()
    zero_plan(masked, plan, ex)

    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert all(a < b for a, b in zip(convs(pruned), convs(net)))
    assert pruned.head.out_features == 10
    assert measure.count_parameters(pruned) < 0.5 * measure.count_parameters(net)
    assert measure.count_macs(pruned, ex) < 0.5 * measure.count_macs(net, ex)
    x = torch.randn(6, *shape)
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked(x), atol=1e-4)
        assert not torch.allclose(net(x), masked(x), atol=1e-3)  # the channels removed did matter


def test_channel_pruning_callback_exports_pt2_that_loads_without_project_code_and_resumes(tmp_path):
    L.seed_everything(4)
    model = ImageClassifier(10, 1, 28, arch="cnn")
    dense_params = measure.count_parameters(model.net)
    pruner = ChannelPruning(amount=0.5, norm=2, epoch=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor=None)
    trainer = make_trainer(tmp_path, [pruner, ckpt], max_epochs=1, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(model, TinyData())
    assert measure.count_parameters(model.net) < 0.5 * dense_params
    artefact = Path(trainer.log_dir) / "pruned_model.pt2"
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
    tester.test(fresh, TinyData(), ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=True)
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
                 enable_checkpointing=False).fit(model, TinyData())
    conv1 = next(e for e in pruner.plan if e["layer"] == "backbone.features.0")
    assert conv1["idxs"] == [0, 1, 2]  # the weak channels of the loaded weights went


def test_channel_pruning_mid_fit_rebuilds_the_optimizer(tmp_path):
    L.seed_everything(5)
    model = ImageClassifier(10, 1, 28, arch="lenet5")
    pruner = ChannelPruning(amount=0.5, epoch=1)
    trainer = make_trainer(tmp_path, [pruner], max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, TinyData())
    assert pruner.pruned and model.net.backbone.features[0].out_channels == 3
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters()}


# ---- bad input --------------------------------------------------------------------------------


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
        trainer.fit(ImageClassifier(10, 1, 28, arch="cnn"), TinyData())
    assert StepCounter.steps == 0


def test_grouped_conv_is_refused_for_channel_pruning():
    with pytest.raises(UserError, match="grouped"):
        check_structured_targets({"conv": nn.Conv2d(4, 8, 3, groups=2)})
