"""InMemoryDataModule: the seeded split, eval vs training batches, the Trainer's hooks, mid-epoch resume,
and every argument declared once with each dataset's own defaults in --help and --print_config."""

import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from torch import nn

import project.data
from project.data import (
    CIFAR10DataModule,
    ImageFolderDataModule,
    InMemoryLoader,
    MNISTDataModule,
    MNISTSampleDataModule,
)
from project.cli import main as cli_main
from project.data import augment as aug
from project.data.base import InMemoryDataModule, split_indices
from project.errors import UserError
from tests.data.conftest import LENET, image_keys, mnist


def test_split_is_disjoint_seeded_and_stable(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = split_indices(100, 0.2, seed=3)
    assert len(val) == 20 and not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))

    dm = mnist(mnist_dir, seed=7)
    first_val = dm._val[0].clone()
    assert not image_keys(dm._train[0]) & image_keys(dm._val[0])
    calls = []
    monkeypatch.setattr(dm, "_load", lambda train: calls.append(train))
    dm.setup("fit")
    dm.setup("test")
    assert calls == [] and torch.equal(dm._val[0], first_val)  # cached, same split
    monkeypatch.undo()
    assert torch.equal(mnist(mnist_dir, seed=7)._val[0], first_val)  # another instance, same seed
    assert not torch.equal(mnist(mnist_dir, seed=8)._val[0], first_val)


@pytest.mark.parametrize("val_size", [300, 1000, 1.0])
def test_val_size_too_large_is_a_user_error(mnist_dir: Path, val_size) -> None:
    with pytest.raises(UserError, match="300|1.0"):
        mnist(mnist_dir, val_size=val_size)
    with pytest.raises(UserError, match=r"val_size 300 .* 300 training images"):
        mnist(mnist_dir, val_size=300)


def test_val_size_zero_means_no_validation(mnist_dir: Path) -> None:
    dm = mnist(mnist_dir, val_size=0)
    assert dm.val_dataloader() == [] and len(dm._train[1]) == 300


def test_eval_batches_are_the_normalised_images_and_train_batches_are_augmented(mnist_dir: Path) -> None:
    dm = mnist(mnist_dir, batch_size=64, crop_padding=4, rotate_degrees=15)
    stored, labels = next(iter(dm.val_dataloader()))
    dm.trainer = SimpleNamespace(training=False)
    out, out_labels = dm.on_after_batch_transfer((stored, labels), 0)
    assert out.dtype == torch.float32 and out_labels is labels
    torch.testing.assert_close(out, aug.normalize(stored, (0.1307,), (0.3081,)))
    dm.trainer = SimpleNamespace(training=True)
    augmented, _ = dm.on_after_batch_transfer((stored, labels), 0)
    assert augmented.shape == out.shape and (augmented - out).abs().amax(dim=(1, 2, 3)).gt(0.1).float().mean() > 0.9
    dm.trainer = None
    torch.testing.assert_close(dm.on_after_batch_transfer((stored, labels), 0)[0], out)  # no trainer: not training


class _Recorder(L.LightningModule):
    """Tiny model that remembers what reached its steps."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(784, 10)
        self.train_batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.val_batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.train_batches.append((self.current_epoch, batch[0].clone(), batch[1].clone()))
        return nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch[0].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_sets_epochs_and_augments_only_in_training(mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=50, batch_size=25, crop_padding=3)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    epochs = [e for e, _, _ in model.train_batches]
    assert epochs == [0, 0, 1, 1]
    labels = [b[2] for b in model.train_batches]
    assert not torch.equal(labels[0], labels[2])  # epoch 1 reshuffled via sampler.set_epoch
    loader = InMemoryLoader(dm._train[0], dm._train[1], 25, shuffle=True, seed=0)
    loader.sampler.set_epoch(1)
    expected_images, expected_labels = next(iter(loader))
    assert torch.equal(labels[2], expected_labels)
    stored_val = aug.normalize(dm._val[0], dm.mean, dm.std)
    torch.testing.assert_close(torch.cat(model.val_batches[:2]), stored_val)  # validation untouched
    train_plain = aug.normalize(expected_images, dm.mean, dm.std)
    assert not torch.allclose(model.train_batches[2][1], train_plain)  # training augmented


def test_trainer_runs_without_validation(mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=0, batch_size=100)
    model = _Recorder()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert len(model.train_batches) == 3 and model.val_batches == []


def _quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**defaults, **kwargs})


class _SaveAtStep(L.Callback):
    """Saves a checkpoint right after optimizer step ``step``, as ModelCheckpoint(every_n_train_steps) would."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_resume_mid_epoch_sees_the_same_batches_as_an_uninterrupted_run(mnist_dir: Path, tmp_path: Path) -> None:
    def datamodule() -> MNISTDataModule:
        return MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=50, batch_size=50)

    whole = _Recorder()
    _quiet_trainer(max_epochs=2).fit(whole, datamodule=datamodule())
    first = _Recorder()
    save = _SaveAtStep(7, tmp_path / "mid.ckpt")  # 5 batches per epoch: inside epoch 1
    _quiet_trainer(max_epochs=2, max_steps=7, callbacks=[save]).fit(first, datamodule=datamodule())
    rest = _Recorder()
    _quiet_trainer(max_epochs=2).fit(rest, datamodule=datamodule(), ckpt_path=tmp_path / "mid.ckpt", weights_only=True)
    labels = [b[2].tolist() for b in whole.train_batches]
    assert len(labels) == 10 and len(first.train_batches) == 7 and len(rest.train_batches) == 3
    assert [b[2].tolist() for b in first.train_batches + rest.train_batches] == labels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_splits_live_on_the_gpu_when_training_there(mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=50, batch_size=25, crop_padding=2)
    model = _Recorder()
    _quiet_trainer(accelerator="gpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1.0).fit(
        model, datamodule=dm
    )
    assert dm._device_splits["train"][0].device.type == "cuda" and dm._train[0].device.type == "cpu"
    assert model.train_batches[0][1].device.type == "cuda" and model.train_batches[0][1].dtype == torch.float32
    stored_val = aug.normalize(dm._val[0], dm.mean, dm.std)
    torch.testing.assert_close(torch.cat(model.val_batches).cpu(), stored_val)


_SHARED_DEFAULTS = dict(batch_size=128, val_size=5000, seed=0, eval_batch_size=None, drop_last=False, crop_padding=0,
                        horizontal_flip=False, rotate_degrees=0.0, translate=0.0, scale=None, mean=None, std=None)


_REQUIRED = object()
# Every argument of every DataModule with its default, in --help order: the dataset's own arguments first.


DEFAULTS = {
    "MNISTDataModule": dict(data_dir="data", download=True, classes=None, samples_per_class=None,
                            **{**_SHARED_DEFAULTS, "mean": [0.1307], "std": [0.3081]}),
    "MNISTSampleDataModule": dict(classes=None, samples_per_class=None,
                                  **{**_SHARED_DEFAULTS, "val_size": 500, "mean": [0.1307], "std": [0.3081]}),
    "CIFAR10DataModule": dict(data_dir="data", download=True,
                              **{**_SHARED_DEFAULTS, "batch_size": 256, "crop_padding": 4, "horizontal_flip": True,
                                 "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}),
    "CIFAR100DataModule": dict(data_dir="data", download=True,
                               **{**_SHARED_DEFAULTS, "batch_size": 256, "crop_padding": 4, "horizontal_flip": True,
                                  "mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}),
    "ImageFolderDataModule": dict(data_dir=_REQUIRED, image_size=32, channels=3, in_memory=False, num_workers=2,
                                  **{**_SHARED_DEFAULTS, "val_size": 0.1}),
}


def _as_help_shows(value) -> str:
    if value is _REQUIRED:
        return "required"
    if value is None:
        return "null"
    return str(tuple(value)) if isinstance(value, list) else str(value)


def help_options(text: str) -> dict[str, tuple[str, str]]:
    """The ``--data.X`` options of a ``--data.help`` page, in order: name -> (description, default as shown)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("  --data.")]
    options = {}
    for start, end in zip(starts, [*starts[1:], len(lines)]):
        spec, _, first = lines[start].strip().partition("  ")  # the description may start on the option's line
        block = " ".join([first, *(line.strip() for line in lines[start + 1 : end])]).strip()
        match = re.fullmatch(r"(.*?)\s*\((required, )?type: (.*?)(?:, default: (.*))?\)", block)
        assert match, f"unexpected help entry: {lines[start:end]}"
        name = re.match(r"--data\.(\w+)", spec).group(1)
        options[name] = (match.group(1), "required" if match.group(2) else match.group(4))
    return options


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_cli_help_lists_every_option_documented_with_the_datasets_default(name, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={LENET}", "--data.help", f"project.data.{name}"])
    assert exit_info.value.code == 0
    options = help_options(capsys.readouterr().out)
    assert list(options) == list(DEFAULTS[name])  # every option, no other, the dataset's own first
    for option, (description, shown) in options.items():
        assert len(description.split()) >= 3, f"--data.{option} is not documented"
        assert shown == _as_help_shows(DEFAULTS[name][option]), f"--data.{option}"


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_print_config_shows_the_datasets_defaults_and_round_trips(
    name, folder_dir, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    required = [f"--data.data_dir={folder_dir}"] if name == "ImageFolderDataModule" else []
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--data=project.data.{name}", *required, "--print_config"])
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)["data"]
    expected = {k: str(folder_dir) if v is _REQUIRED else v for k, v in DEFAULTS[name].items()}
    assert data == {"class_path": f"project.data.{name}", "init_args": expected}
    assert list(data["init_args"]) == list(expected)
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config=printed.yaml", "--print_config"])
    assert capsys.readouterr().out == printed
    # The printed arguments build the DataModule, whose hparams are those arguments again.
    dm = getattr(project.data, name)(**data["init_args"])
    assert dict(dm.hparams) == expected
    assert dict(type(dm)(**dm.hparams).hparams) == expected


def test_subclasses_say_only_what_differs() -> None:
    for path in {inspect.getsourcefile(getattr(project.data, name)) for name in DEFAULTS}:  # base.py declares them
        declared = [arg for arg in _SHARED_DEFAULTS if re.search(rf"\b{arg}: ", Path(path).read_text())]
        assert declared == [], f"{path} declares {declared} again"
    assert list(inspect.signature(MNISTSampleDataModule).parameters)[:2] == ["classes", "samples_per_class"]
    with pytest.raises(TypeError, match=r"name no inherited argument: \['val_sise'\]"):
        type("Typo", (MNISTDataModule,), {"arg_defaults": {"val_sise": 10}})
    with pytest.raises(TypeError, match="pass the shared arguments on with \\*\\*kwargs"):
        type("NoKwargs", (InMemoryDataModule,), {"__init__": lambda self, data_dir="x": None})


def test_own_arguments_stay_positional_and_mean_std_follow_the_channels(mnist_dir: Path, folder_dir: Path) -> None:
    dm = MNISTDataModule(str(mnist_dir), False, val_size=10, mean=None, std=None)
    assert (dm.data_dir, dm.download, dm.mean, dm.std) == (mnist_dir, False, (0.5,), (0.5,))
    assert ImageFolderDataModule(str(folder_dir), 16, 1).mean == (0.5,)
    with pytest.raises(UserError, match="mean/std have 3 values but the images have 1 channels"):
        MNISTDataModule(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    with pytest.raises(UserError, match=r"mean \[0.1\] and std \[1.0, 1.0\] need one value per channel"):
        CIFAR10DataModule(mean=(0.1,), std=(1.0, 1.0))
