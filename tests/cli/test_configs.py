"""Every experiment config under configs/ runs ``fit`` for one step, one validation and one test batch (a new
config is tested without editing this file), and must leave what a run leaves: a checkpoint that loads with
``weights_only=True`` into the model, every callback the config names in the trainer, a finite training loss.
Trainer presets under configs/trainer/ and the compress variant fragments are composed with a small experiment."""

import importlib
import math
from pathlib import Path

import pytest
import torch
import yaml

from project.cli import ProjectCLI
from tests.conftest import REPO
from tests.tb import scalars
from tests.toys import teacher_overrides

FRAGMENTS = ("trainer", "compress")  # partial configs, composed with an experiment below
CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if not set(FRAGMENTS) & set(p.relative_to(REPO / "configs").parts)
)
COMPRESS = sorted((REPO / "project" / "commands" / "compress_variants").glob("*.yaml"))
assert COMPRESS, "the compress variant configs moved: point COMPRESS at them"
# presets that need hardware this machine lacks, or several processes (tested in tests/cli/test_distributed.py)
PRESETS = sorted(p for p in (REPO / "configs" / "trainer").glob("*.yaml") if p.stem in {"cpu"})


def _data_overrides(config: Path, fake_data_dirs: dict[str, Path]) -> list[str]:
    data = (yaml.safe_load(config.read_text()) or {}).get("data", {})
    cls = data.get("class_path", "").rsplit(".", 1)[-1]
    if cls not in fake_data_dirs:
        return []
    # fast_dev_run takes one batch per stage; at the configs' own sizes (up to 512), cifar10_fast's bf16 ResNet-9
    # step took 109 s on a CPU without native bf16
    return [f"--data.data_dir={fake_data_dirs[cls]}", "--data.val_size=32", "--data.batch_size=32",
            "--data.eval_batch_size=32"]


def _model_overrides(config: Path) -> list[str]:
    init_args = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("init_args") or {}
    # a config that starts from another run's weights is tested without them
    # (tests/tasks/test_init_weights.py covers init_from)
    return ["--model.init_from=null"] if init_args.get("init_from") else []


# max_steps, not max_epochs: the configs' own epoch counts stay, which their callbacks' schedules are checked against
ONE_STEP = ["--trainer.max_steps=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false"]


def _named_callbacks(*configs: Path) -> list[type]:
    """The callback classes the configs' ``trainer.callbacks`` name."""
    classes = []
    for config in configs:
        for entry in ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("callbacks") or []:
            module, name = entry["class_path"].rsplit(".", 1)
            classes.append(getattr(importlib.import_module(module), name))
    return classes


def _fit_one_step(configs: list[Path], extra: list[str]) -> None:
    """``fit`` with the configs for one step, then check what the run left behind."""
    cli = ProjectCLI(["fit", *[f"--config={c}" for c in configs], *ONE_STEP, *extra])
    trainer = cli.trainer
    assert trainer.global_step == 1, f"the run took {trainer.global_step} optimizer steps, not 1"
    for cls in _named_callbacks(*configs):
        assert any(isinstance(cb, cls) for cb in trainer.callbacks), f"{cls.__name__} was dropped from the trainer"
    logged = scalars(Path(trainer.log_dir))
    assert len(logged["train/loss_epoch"]) == 1 and math.isfinite(logged["train/loss_epoch"][0]), logged.get("train/loss_epoch")
    assert math.isfinite(float(trainer.callback_metrics["test/acc"])), "fit did not test the best checkpoint"
    last = Path(trainer.log_dir) / "checkpoints" / "last.ckpt"
    best = trainer.checkpoint_callback.best_model_path  # none when the config validates nothing
    assert last.is_file() and (not best or Path(best).is_file()), sorted(last.parent.iterdir())
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    missing, unexpected = cli.model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith("teacher.")], (missing, unexpected)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_runs_and_leaves_a_checkpoint(config: Path, fake_data_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _fit_one_step([config], ["--trainer.accelerator=cpu", *_data_overrides(config, fake_data_dirs),
                             *_model_overrides(config), *teacher_overrides(config, tmp_path)])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_trainer_preset_composes(preset: Path, fake_data_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "mnist_lenet.yaml"
    _fit_one_step([config, preset], _data_overrides(config, fake_data_dirs))


@pytest.mark.parametrize("fragment", COMPRESS, ids=lambda p: p.name)
def test_compress_variant_composes(fragment: Path, fake_data_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "mnist_lenet.yaml"
    _fit_one_step([config, fragment], _data_overrides(config, fake_data_dirs))
