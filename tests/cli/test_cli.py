"""The command line end to end: fit -> checkpoint -> test in a fresh process, overrides, print_config,
resume with --ckpt_path last, TensorBoard contents, and one-line errors for bad input."""

import pickle
from pathlib import Path

import pytest
import torch

from project.cli import main
from tests.conftest import REPO, run_project
from tests.helpers import SimulatedCrash
from tests.tb import hparams_entry, read_run, scalars

LENET = str(REPO / "configs" / "mnist_lenet.yaml")


def _fit_args(data_dir: Path, *extra: str) -> list[str]:
    return [
        "fit", f"--config={LENET}", f"--data.data_dir={data_dir}", "--data.val_size=128", "--data.batch_size=32",
        "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=2", "--data.rotate_degrees=0", "--data.translate=0", *extra,
    ]


def _versions(tmp_path: Path, name: str = "mnist_lenet") -> list[Path]:
    return sorted((tmp_path / "lightning_logs" / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


@pytest.fixture
def trained_run(fake_mnist_dir, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    main(_fit_args(fake_mnist_dir))
    return _versions(tmp_path)[-1]


def test_fit_logs_everything_and_test_in_fresh_process_reproduces_it(trained_run, fake_mnist_dir, tmp_path) -> None:
    ckpt_dir = trained_run / "checkpoints"
    assert (ckpt_dir / "best.ckpt").is_file() and (ckpt_dir / "last.ckpt").is_file()
    run = read_run(trained_run)
    tags = set(run.Tags()["scalars"])
    assert {"train/loss_epoch", "train/acc", "train/f1", "val/loss", "val/acc", "val/f1", "test/acc", "test/f1"} <= tags
    assert any(t.startswith("lr-") for t in tags), tags
    assert "test/confusion_matrix" in run.Tags()["images"]
    logged = scalars(trained_run)
    assert logged["test/acc"][-1] > 0.5  # the fake digits are learnable: far above chance (0.1)

    result = run_project(
        ["test", f"--config={LENET}", f"--data.data_dir={fake_mnist_dir}", "--data.val_size=128",
         f"--ckpt_path={ckpt_dir / 'best.ckpt'}", "--trainer.accelerator=cpu"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = _versions(tmp_path)[-1]
    assert fresh != trained_run  # a new version folder, nothing overwritten
    assert scalars(fresh)["test/acc"][-1] == pytest.approx(logged["test/acc"][-1], abs=1e-6)
    # the HPARAMS tab's entry is written after Lightning closed the logger: it must reach the disk before exit
    values, metrics = hparams_entry(fresh)
    assert values["model.arch"] == "lenet5" and "hp/test_acc" in metrics


def test_overrides_change_the_run(fake_mnist_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(_fit_args(fake_mnist_dir, "--trainer.max_epochs=1", "--data.batch_size=32", "--test_after_fit=false"))
    ckpt = torch.load(_versions(tmp_path)[-1] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0
    assert ckpt["global_step"] == (512 - 128 + 31) // 32  # one epoch of batch 32 over the 384 training images


def test_last_checkpoint_is_rewritten_after_epochs_that_do_not_improve(fake_mnist_dir, tmp_path, monkeypatch) -> None:
    """Monitoring the epoch number with mode min: epoch 0 stays the best, no later epoch improves on it."""
    monkeypatch.chdir(tmp_path)
    main(_fit_args(fake_mnist_dir, "--trainer.max_epochs=3", "--test_after_fit=false",
                   "--checkpoint.monitor=epoch", "--checkpoint.mode=min"))
    checkpoints = _versions(tmp_path)[-1] / "checkpoints"
    assert torch.load(checkpoints / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 2


def test_optimizer_and_scheduler_from_the_command_line(fake_mnist_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(_fit_args(
        fake_mnist_dir, "--trainer.max_epochs=1", "--test_after_fit=false",
        "--model.init_args.optimizer=torch.optim.SGD", "--model.init_args.optimizer.lr=0.05",
        "--model.init_args.optimizer.momentum=0.9", "--model.init_args.optimizer.nesterov=true",
        "--model.init_args.lr_scheduler=project.tasks.WarmupCosineLR",
    ))
    ckpt = torch.load(_versions(tmp_path)[-1] / "checkpoints" / "last.ckpt", weights_only=True)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["nesterov"] is True and group["momentum"] == 0.9
    assert group["lr"] == pytest.approx(0.0, abs=1e-6)  # the cosine schedule ran to its end in one epoch


def test_print_config_round_trips(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={LENET}", "--trainer.max_epochs=3", "--data.batch_size=256", "--print_config"])
    assert exit_info.value.code == 0
    first = capsys.readouterr().out
    assert "max_epochs: 3" in first and "batch_size: 256" in first
    (tmp_path / "printed.yaml").write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config=printed.yaml", "--print_config"])
    assert capsys.readouterr().out == first


def test_several_configs_merge_in_order(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "more.yaml").write_text("trainer:\n  max_epochs: 7\ndata:\n  init_args:\n    batch_size: 16\n")
    with pytest.raises(SystemExit):
        main(["fit", f"--config={LENET}", "--config=more.yaml", "--print_config"])
    out = capsys.readouterr().out
    assert "max_epochs: 7" in out and "batch_size: 16" in out and "arch: lenet5" in out


def test_help_documents_options_from_docstrings(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.help=project.tasks.ImageClassifier"])
    out = capsys.readouterr().out
    assert "label_smoothing" in out and "Cross-entropy label smoothing" in out


def test_resume_with_ckpt_path_last_continues_exactly_in_a_new_version(fake_mnist_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(_fit_args(fake_mnist_dir, "--trainer.max_epochs=3", "--test_after_fit=false"))
    uninterrupted = _versions(tmp_path)[-1]
    with pytest.raises(SimulatedCrash):
        main(_fit_args(fake_mnist_dir, "--trainer.max_epochs=3", "--test_after_fit=false",
                       "--trainer.callbacks+=tests.helpers.CrashAtEpoch", "--trainer.callbacks.epoch=2"))
    crashed = _versions(tmp_path)[-1]
    assert torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1

    main(_fit_args(fake_mnist_dir, "--trainer.max_epochs=3", "--test_after_fit=false", "--ckpt_path=last"))
    resumed = _versions(tmp_path)[-1]
    assert resumed not in (uninterrupted, crashed)  # a new version folder; earlier runs are left alone
    assert (crashed / "checkpoints" / "last.ckpt").is_file()
    expected = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["epoch"] == expected["epoch"] == 2 and got["global_step"] == expected["global_step"]
    for key, value in expected["state_dict"].items():  # same data order, same schedule: the same weights
        torch.testing.assert_close(got["state_dict"][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args,message",
    [
        (["fit", "--config=nope.yaml"], "nope.yaml"),
        (["fit", f"--config={LENET}", "--trainer.max_epocs=3"], "max_epocs"),
        (["fit", f"--config={LENET}", "--trainer.max_epochs=three"], "max_epochs"),
        (["test", f"--config={LENET}", "--ckpt_path=missing.ckpt"], "missing.ckpt does not exist"),
        (["fit", f"--config={LENET}", "--data.data_dir=empty", "--data.download=false"], "MNIST not found"),
    ],
    ids=["missing-config", "mistyped-key", "wrong-type", "missing-ckpt", "missing-data"],
)
def test_bad_input_gives_a_clear_error_and_nonzero_exit(args, message, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_project(args, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "lightning_logs").exists() or not any((tmp_path / "lightning_logs").rglob("*.ckpt"))


def test_checkpoint_of_other_num_classes_is_refused(trained_run, fake_mnist_dir, tmp_path) -> None:
    result = run_project(
        ["test", f"--config={LENET}", f"--data.data_dir={fake_mnist_dir}", "--data.classes=[0,1,2]",
         f"--ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "net.head.weight" in result.stderr and "num_classes" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_carrying_code_is_refused(fake_mnist_dir, tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    with evil.open("wb") as f:
        pickle.dump({"state_dict": {}, "payload": Payload()}, f)
    result = run_project(["test", f"--config={LENET}", f"--data.data_dir={fake_mnist_dir}", f"--ckpt_path={evil}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "refused" in result.stderr
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(trained_run, fake_mnist_dir, tmp_path) -> None:
    data = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(data[: len(data) // 2])
    result = run_project(["test", f"--config={LENET}", f"--data.data_dir={fake_mnist_dir}", f"--ckpt_path={broken}"], cwd=tmp_path)
    assert result.returncode == 2 and "unreadable" in result.stderr


def test_real_mnist_accuracy_rises_well_above_chance(real_mnist_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", f"--config={LENET}", f"--data.data_dir={real_mnist_dir}", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=60", "--trainer.limit_val_batches=10", "--trainer.limit_test_batches=20",
          "--trainer.enable_progress_bar=false"])
    assert scalars(_versions(tmp_path)[-1])["test/acc"][-1] > 0.85


def test_predict_runs_on_the_exported_int8_program(fake_mnist_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    qat = str(REPO / "configs" / "qat" / "mnist_lenet_int8.yaml")
    common = [f"--config={qat}", f"--data.data_dir={fake_mnist_dir}", "--data.val_size=64"]
    main(["fit", *common, "--trainer.max_epochs=3", "--trainer.callbacks.start_epoch=1",
          "--trainer.callbacks.freeze_observers_epoch=null", "--trainer.callbacks.freeze_bn_epoch=null",
          "--trainer.enable_progress_bar=false", "--data.rotate_degrees=0", "--data.translate=0",
          "--test_after_fit=false"])
    run = sorted((tmp_path / "lightning_logs" / "mnist_lenet_int8").glob("version_*"))[-1]
    main(["test", *common, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])  # the weights that were exported
    tested = sorted((tmp_path / "lightning_logs" / "mnist_lenet_int8").glob("version_*"))[-1]
    main(["predict", *common, f"--ckpt_path={run / 'model.pt2'}"])
    out = sorted((tmp_path / "lightning_logs" / "mnist_lenet_int8").glob("version_*"))[-1] / "predictions.csv"
    rows = out.read_text().splitlines()
    assert rows[0] == "index,pred,prob" and len(rows) == 1 + 128
    preds = [int(r.split(",")[1]) for r in rows[1:]]
    accuracy = sum(p == y for p, y in zip(preds, _fake_test_labels(fake_mnist_dir))) / len(preds)
    assert accuracy == pytest.approx(scalars(tested)["test/acc_int8"][-1], abs=1e-6)


def _fake_test_labels(data_dir: Path) -> list[int]:
    from project.data.idx import read_idx

    return read_idx(data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").tolist()


def test_fit_ends_by_saying_where_the_run_is_and_help_names_the_command(tmp_path) -> None:
    result = run_project(["fit", f"--config={REPO / 'configs' / 'quickstart.yaml'}", "--trainer.max_epochs=1",
                          "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
                          "--trainer.enable_progress_bar=false", "--test_after_fit=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in result.stdout.strip().splitlines()[-3:])
    assert (tmp_path / lines["run folder"].strip()).is_dir()
    assert (tmp_path / lines["best checkpoint"].strip()).is_file()
    assert lines["look at it"].strip() == "tensorboard --logdir lightning_logs/quickstart"
    usage = run_project(["fit", "--help"], cwd=tmp_path).stdout
    assert usage.startswith("usage: python -m project ")


def test_default_root_dir_is_where_the_run_goes_and_an_unwritable_one_fails_at_start(tmp_path) -> None:
    quick = [f"--config={REPO / 'configs' / 'quickstart.yaml'}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
             "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--test_after_fit=false"]
    result = run_project(["fit", *quick, "--trainer.default_root_dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "lightning_logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "lightning_logs").exists()
    (tmp_path / "a_file").write_text("not a folder")
    result = run_project(["fit", *quick, f"--trainer.default_root_dir={tmp_path / 'a_file' / 'runs'}"], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "default_root_dir" in lines[0], lines
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_fit_exports_the_network_it_trained_to_every_runtime_asked(fake_mnist_dir, tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    import numpy as np

    from project.checkpoints import load_network
    from project.compression.artifacts import load_runner
    from project.compression.export import with_input_normalization

    monkeypatch.chdir(tmp_path)
    main(["fit", f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--data.data_dir={fake_mnist_dir}", "--data.val_size=64",
          "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.enable_progress_bar=false",
          "--test_after_fit=false", "--export=torch,onnxruntime,openvino"])
    (run,) = (tmp_path / "lightning_logs" / "mnist_lenet").glob("version_*")
    net, _ = load_network(run / "checkpoints" / "last.ckpt")  # the weights the export was written from
    images = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        expected = with_input_normalization(net, (0.1307,), (0.3081,)).eval()(images).argmax(-1).numpy()
    for name in ("model.pt2", "model.onnx", "model.xml"):
        predicted = np.asarray(load_runner(run / name)(images.numpy())).argmax(-1)
        assert (predicted == expected).all(), name


def test_fit_exports_nothing_by_default_without_a_compression_callback(fake_mnist_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--data.data_dir={fake_mnist_dir}", "--data.val_size=64",
          "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false",
          "--test_after_fit=false"])
    (run,) = (tmp_path / "lightning_logs" / "mnist_lenet").glob("version_*")
    assert not [p.name for p in run.iterdir() if p.name.startswith("model.")]
