"""Fine-tuning through the command line: the split-MNIST configs (pretrain, then fine-tune with a frozen
backbone or a schedule of phases), early stopping in every fine-tuning config, a missing init_from file."""

import pytest
import torch
import yaml

from project.callbacks.freezing import FreezeSchedule, Phase
from tests.conftest import REPO


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
