"""Bad input, end to end through the CLI: one ``error: ...`` line on stderr that says what to fix,
exit status 2, and no run output written (no checkpoint, no new version folder)."""

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from project.cli import main
from tests import fakes
from tests.conftest import REPO, run_project

LENET = str(REPO / "configs" / "mnist_lenet.yaml")
FOLDER = str(REPO / "configs" / "finetune" / "folder.yaml")
CNN = str(REPO / "configs" / "cifar10_cnn.yaml")
PRUNE = str(REPO / "configs" / "prune" / "mnist_lenet_unstructured.yaml")


def _mnist(tmp: Path, src: Path) -> list[str]:
    return [f"--config={LENET}", f"--data.data_dir={src}", "--data.val_size=64", "--trainer.max_epochs=1"]


def _truncated_mnist(tmp: Path, src: Path) -> list[str]:
    shutil.copytree(src, tmp / "mnist")
    images = tmp / "mnist" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    return [f"--config={LENET}", f"--data.data_dir={tmp / 'mnist'}", "--data.val_size=64"]


def _corrupt_cifar(tmp: Path, src: Path) -> list[str]:
    fakes.write_fake_cifar10(tmp / "cifar", n_train=50, n_test=10)
    batch = tmp / "cifar" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:300])
    return [f"--config={CNN}", f"--data.data_dir={tmp / 'cifar'}", "--data.val_size=5"]


def _folder(tmp: Path, **kwargs) -> Path:
    return fakes.write_fake_image_folder(tmp / "folder", classes=("a", "b"), n_per_class=4, size=16, **kwargs)


def _empty_folder(tmp: Path, src: Path) -> list[str]:
    for split in ("train/a", "train/b", "test/a", "test/b"):
        (tmp / "folder" / split).mkdir(parents=True)
    return [f"--config={FOLDER}", f"--data.data_dir={tmp / 'folder'}", "--model.init_from=null"]


def _unreadable_image(tmp: Path, src: Path) -> list[str]:
    root = _folder(tmp)
    next((root / "train" / "a").iterdir()).write_bytes(b"not an image at all")
    return [f"--config={FOLDER}", f"--data.data_dir={root}", "--model.init_from=null", "--data.num_workers=0"]


def _test_classes_differ(tmp: Path, src: Path) -> list[str]:
    root = _folder(tmp)
    (root / "test" / "b").rename(root / "test" / "c")
    return [f"--config={FOLDER}", f"--data.data_dir={root}", "--model.init_from=null"]


def _checkpoint(tmp: Path, src: Path, **overrides: str) -> Path:
    """A real checkpoint of a tiny LeNet-5 fit on the fake data."""
    main(["fit", *_mnist(tmp, src), "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
          "--test_after_fit=false", "--trainer.logger.init_args.save_dir=ckpt_source"])
    ckpt = next((tmp / "ckpt_source").rglob("last.ckpt"))
    shutil.move(ckpt, tmp / "lenet.ckpt")
    shutil.rmtree(tmp / "ckpt_source", ignore_errors=True)
    return tmp / "lenet.ckpt"


def _other_arch(tmp: Path, src: Path) -> list[str]:
    ckpt = _checkpoint(tmp, src)
    return [*_mnist(tmp, src), "--model.init_args.arch=mlp", f"--model.init_args.init_from={ckpt}"]


def _other_classes(tmp: Path, src: Path) -> list[str]:
    ckpt = _checkpoint(tmp, src)
    return [f"--config={LENET}", f"--data.data_dir={src}", "--data.val_size=64", "--data.classes=[0,1]",
            f"--ckpt_path={ckpt}"]


def _truncated_ckpt(tmp: Path, src: Path) -> list[str]:
    ckpt = _checkpoint(tmp, src)
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    return [*_mnist(tmp, src), f"--ckpt_path={ckpt}"]


def _unwritable_logs(tmp: Path, src: Path) -> list[str]:
    (tmp / "a_file").write_text("not a folder")
    return [*_mnist(tmp, src), f"--trainer.logger.init_args.save_dir={tmp / 'a_file' / 'logs'}"]


def _args(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, src: [*_mnist(tmp, src), *extra]


CASES = {
    "unknown-key": ("fit", _args("--trainer.max_epocs=3"), "unrecognized arguments: --trainer.max_epocs"),
    "mistyped-model-key": ("fit", _args("--model.init_args.label_smothing=0.1"), "label_smothing"),
    "wrong-type": ("fit", _args("--data.batch_size=many"), "data.batch_size: Expected a <class 'int'>"),
    "negative-lr": ("fit", _args("--model.init_args.optimizer.init_args.lr=-0.1"), "Invalid learning rate: -0.1"),
    "negative-epochs": ("fit", _args("--trainer.max_epochs=-3"), "max_epochs must be >= 0"),
    "label-smoothing-1": ("fit", _args("--model.init_args.label_smoothing=1.0"), "label_smoothing must be in [0, 1)"),
    "unknown-arch": ("fit", _args("--model.init_args.arch=lenet6"), "unknown architecture 'lenet6'"),
    "sparsity-1": ("fit", lambda t, s: [f"--config={PRUNE}", f"--data.data_dir={s}", "--data.val_size=64",
                                       "--trainer.callbacks.amount=1.0"], "pruning amount"),
    "val-larger-than-train": ("fit", _args("--data.val_size=100000"), "val_size 100000 is not smaller than the 512"),
    "missing-config": ("fit", lambda t, s: ["--config=nope.yaml"], "nope.yaml"),
    "missing-checkpoint": ("test", _args("--ckpt_path=nope.ckpt"), "nope.ckpt does not exist"),
    "missing-data-offline": ("fit", lambda t, s: [f"--config={LENET}", f"--data.data_dir={t / 'empty'}",
                                                  "--data.download=false"], "MNIST not found in"),
    "truncated-mnist": ("fit", _truncated_mnist, "train-images-idx3-ubyte"),
    "corrupt-cifar": ("fit", _corrupt_cifar, "data_batch_3"),
    "folder-without-images": ("fit", _empty_folder, "has no images"),
    "unreadable-image": ("fit", _unreadable_image, "could not be decoded as an image"),
    "test-classes-differ": ("fit", _test_classes_differ, "classes"),
    "checkpoint-other-arch": ("fit", _other_arch, "lenet.ckpt"),
    "checkpoint-other-num-classes": ("test", _other_classes, "num_classes"),
    "truncated-checkpoint": ("fit", _truncated_ckpt, "unreadable"),
    "unwritable-log-folder": ("fit", _unwritable_logs, "cannot write the run's logs"),
    "unknown-export-runtime": ("fit", _args("--export=tflite"), "--export 'tflite': choose auto, none or"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case: str, fake_mnist_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    subcommand, make_args, message = CASES[case]
    args = [subcommand, *make_args(tmp_path, fake_mnist_dir)]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    after = sorted(str(p) for p in tmp_path.rglob("*"))
    new = [p for p in after if p not in before]
    assert not any(p.endswith(".ckpt") for p in new), new
    assert not any("version_" in p for p in new), new  # no run folder for a run that never started


@pytest.mark.parametrize(
    ("args", "suggestion"),
    [
        (["--trainer.max_epoch", "2"], "--trainer.max_epochs"),  # an abbreviation is not accepted
        (["--trainer.max_epoh", "2"], "--trainer.max_epochs"),  # a typo
        (["--model.init_args.lr", "0.1"], "--model.init_args.optimizer.init_args.lr"),  # misplaced
    ],
)
def test_unknown_options_are_refused_with_a_did_you_mean(args, suggestion, tmp_path) -> None:
    result = run_project(["fit", f"--config={REPO / 'configs' / 'quickstart.yaml'}", *args], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(f"did you mean {suggestion}?"), lines
    assert not (tmp_path / "lightning_logs").exists()


def test_a_misspelled_config_path_gets_the_closest_config(tmp_path) -> None:
    result = run_project(["fit", f"--config={REPO / 'configs' / 'quikstart.yaml'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"did you mean {REPO / 'configs' / 'quickstart.yaml'}?")
