"""Every experiment config under configs/ runs ``fit`` with ``fast_dev_run`` (a new config is tested
without editing this file). Trainer presets under configs/trainer/ are composed with a small experiment."""

from pathlib import Path

import pytest
import yaml

from project.cli import main
from tests.conftest import REPO
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


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_runs_fast_dev_run(config: Path, fake_data_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", f"--config={config}", "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
          *_data_overrides(config, fake_data_dirs), *_model_overrides(config), *teacher_overrides(config, tmp_path)])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_trainer_preset_composes(preset: Path, fake_data_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "mnist_lenet.yaml"
    main(["fit", f"--config={config}", f"--config={preset}", "--trainer.fast_dev_run=true",
          *_data_overrides(config, fake_data_dirs)])


@pytest.mark.parametrize("fragment", COMPRESS, ids=lambda p: p.name)
def test_compress_variant_composes(fragment: Path, fake_data_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "mnist_lenet.yaml"
    main(["fit", f"--config={config}", f"--config={fragment}", "--trainer.fast_dev_run=true",
          *_data_overrides(config, fake_data_dirs)])
