"""Knowledge distillation: the loss, a teacher that stays frozen and in eval mode, student checkpoints
without the teacher, composition with pruning and QAT of the student, and the CLI end to end.

The teachers come from :func:`tests.toys.write_teacher_checkpoint` and :func:`tests.toys.teacher_overrides`
(``tests/cli/test_configs.py`` gives every distillation config a teacher with the latter).
"""

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning import Callback, seed_everything

from project.cli import main
from project.errors import UserError
from project.tasks.classifier import ImageClassifier
from project.tasks.distill import DistillationClassifier, distillation_loss
from tests.conftest import REPO, run_project
from tests.tb import read_run, scalars
from tests.toys import cpu_trainer, random_loader, teacher_overrides, write_teacher_checkpoint

DISTILL_MNIST = REPO / "configs" / "distill" / "mnist_lenet_to_mlp.yaml"
STUDENT = {"arch": "mlp", "arch_kwargs": {"hidden": [16]}}
# BatchNorm (running statistics) and dropout: eval mode shows in both
TEACHER = {"arch": "cnn", "arch_kwargs": {"channels": [4, 8], "hidden": 16, "batch_norm": True, "dropout": 0.5}}


# max_epochs, limit_train_batches and limit_val_batches can be overridden; the sanity check runs (Lightning's 2 steps)
_trainer = partial(cpu_trainer, None, max_epochs=2, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=2)


def _student(teacher: Path, **kwargs: Any) -> DistillationClassifier:
    seed_everything(0)
    return DistillationClassifier(teacher_checkpoint=str(teacher), num_classes=10, **{**STUDENT, **kwargs})


class _Recorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.modes: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        teacher = getattr(pl_module, "teacher", None)
        self.modes.append((pl_module.net.training, teacher is not None and teacher.training))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.fixture
def teacher_ckpt(tmp_path) -> Path:
    return write_teacher_checkpoint(tmp_path / "teacher.ckpt", num_classes=10, **TEACHER)


def test_distillation_loss_is_scaled_kl() -> None:
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    p_t = F.softmax(t / 3, dim=-1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / 3, dim=-1))).sum(-1).mean() * 9
    assert distillation_loss(s, t, 3.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_changes_the_students_loss(teacher_ckpt) -> None:
    images, labels = next(iter(random_loader()))
    model = _student(teacher_ckpt, alpha=0.9, temperature=2.0)
    with torch.no_grad():
        s, t = model(images), model.teacher(images)
    ce = F.cross_entropy(s, labels)
    expected_first = 0.1 * ce + 0.9 * distillation_loss(s, t, 2.0)

    runs = {}
    for name, make in {
        "plain": lambda: (seed_everything(0), ImageClassifier(num_classes=10, **STUDENT))[1],
        "alpha0": lambda: _student(teacher_ckpt, alpha=0.0),
        "alpha0.9": lambda: _student(teacher_ckpt, alpha=0.9, temperature=2.0),
    }.items():
        recorder = _Recorder()
        seed_everything(0)
        _trainer([recorder]).fit(make(), random_loader(), random_loader(seed=1))
        runs[name] = recorder.losses
    assert runs["alpha0"] == pytest.approx(runs["plain"], abs=1e-6)  # alpha 0 is plain cross-entropy training
    assert runs["alpha0.9"][0] == pytest.approx(expected_first.item(), rel=1e-5)
    assert abs(runs["alpha0.9"][0] - runs["plain"][0]) > 1e-3


def test_teacher_stays_frozen_in_eval_mode_and_out_of_the_optimizer(teacher_ckpt) -> None:
    model = _student(teacher_ckpt)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.net.state_dict().items()}
    recorder = _Recorder()
    trainer = _trainer([recorder])
    trainer.fit(model, random_loader(), random_loader(seed=1))

    assert recorder.modes and all(net and not teacher for net, teacher in recorder.modes)
    saved = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    after = model.teacher.state_dict()
    assert any(k.endswith("running_mean") for k in after)
    for key, value in after.items():  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(value, before[key]) and torch.equal(value, saved["net." + key]), key
    assert not any(p.requires_grad for p in model.teacher.parameters())
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert in_optimizer and not in_optimizer & {id(p) for p in model.teacher.parameters()}
    assert any(not torch.equal(v, student_before[k]) for k, v in model.net.state_dict().items())
    assert not any(n.startswith("teacher") for n, _ in model.net.named_modules())


def test_checkpoint_holds_only_the_student_and_loads_as_image_classifier(teacher_ckpt, tmp_path) -> None:
    model = _student(teacher_ckpt)
    trainer = _trainer(max_epochs=1)
    trainer.fit(model, random_loader(), random_loader(seed=1))
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    state = torch.load(tmp_path / "student.ckpt", weights_only=True)["state_dict"]
    assert state and all(k.startswith("net.") for k in state), list(state)

    images = next(iter(random_loader(seed=2)))[0]
    model.eval()
    plain = ImageClassifier(num_classes=10, **STUDENT)
    plain.load_state_dict(state)  # strict
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "student.ckpt", weights_only=True)
    assert type(loaded) is ImageClassifier
    with torch.no_grad():
        assert torch.equal(plain.eval()(images), model(images))
        assert torch.equal(loaded.eval()(images), model(images))

    # resuming a distillation from it: the student comes back, the teacher stays the teacher_checkpoint's
    again = DistillationClassifier(teacher_checkpoint=str(teacher_ckpt), num_classes=10, **STUDENT)
    again.load_state_dict(state)  # strict: the missing teacher entries are expected
    teacher_saved = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, teacher_saved["net." + k]) for k, v in again.teacher.state_dict().items())
    with pytest.raises(RuntimeError, match="Missing key"):  # other missing keys are still errors
        again.load_state_dict({k: v for k, v in state.items() if k != "net.head.bias"})


def test_bad_teachers_are_one_line_user_errors(teacher_ckpt, tmp_path) -> None:
    with pytest.raises(UserError, match="num_classes=10 but the data has num_classes=2"):
        DistillationClassifier(teacher_checkpoint=str(teacher_ckpt), num_classes=2, **STUDENT)
    with pytest.raises(UserError, match="in_channels=1 but the data has in_channels=3"):
        DistillationClassifier(teacher_checkpoint=str(teacher_ckpt), num_classes=10, in_channels=3, image_size=28, **STUDENT)
    with pytest.raises(UserError, match="does not exist"):
        DistillationClassifier(teacher_checkpoint=str(tmp_path / "nope.ckpt"), num_classes=10, **STUDENT)
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(UserError, match="no hyper_parameters"):
        DistillationClassifier(teacher_checkpoint=str(tmp_path / "bare.ckpt"), num_classes=10, **STUDENT)
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    ckpt["hyper_parameters"].update(arch="lenet5", arch_kwargs=None)
    torch.save(ckpt, tmp_path / "wrong_arch.ckpt")
    with pytest.raises(UserError, match="do not fit its architecture 'lenet5'"):
        DistillationClassifier(teacher_checkpoint=str(tmp_path / "wrong_arch.ckpt"), num_classes=10, **STUDENT)
    for bad in ({"temperature": 0.0}, {"alpha": 1.5}):
        with pytest.raises(UserError):
            DistillationClassifier(teacher_checkpoint=str(teacher_ckpt), num_classes=10, **STUDENT, **bad)


def test_pruning_the_student_leaves_the_teacher_dense(teacher_ckpt) -> None:
    from project.callbacks.magnitude_pruning import MagnitudePruning

    model = _student(teacher_ckpt)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer = _trainer([MagnitudePruning(amount=0.5)], max_epochs=1)
    trainer.fit(model, random_loader(), random_loader(seed=1))
    student = [m.weight for m in model.net.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in student) / sum(w.numel() for w in student)
    assert zeros == pytest.approx(0.5, abs=0.01)
    assert all(torch.equal(v, before[k]) for k, v in model.teacher.state_dict().items())


def test_qat_of_the_student_trains_against_the_float_teacher(teacher_ckpt) -> None:
    from project.callbacks.qat import QuantizationAwareTraining
    from project.compression.quantization import fake_quantizers

    model = _student(teacher_ckpt)
    teacher = model.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    recorder = _Recorder()
    qat = QuantizationAwareTraining(evaluate_int8=False)
    _trainer([recorder, qat], max_epochs=1).fit(model, random_loader(), random_loader(seed=1))
    assert fake_quantizers(model.net) and not fake_quantizers(model.teacher)  # the student was swapped, not the teacher
    assert model.teacher is teacher and not teacher.training
    assert recorder.losses and all(torch.isfinite(torch.tensor(recorder.losses)))
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(k.startswith("teacher.") for k in model.state_dict())


def test_cli_teacher_then_distillation_then_test_as_plain_mlp(fake_mnist_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    common = [f"--data.data_dir={fake_mnist_dir}", "--data.val_size=128", "--data.batch_size=64",
              "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    # the teacher lands where the distillation config looks for it (relative to the working directory)
    main(["fit", f"--config={REPO / 'configs' / 'mnist_lenet.yaml'}", *common, "--trainer.max_epochs=1",
          "--test_after_fit=false"])
    assert (tmp_path / "lightning_logs/mnist_lenet/version_0/checkpoints/best.ckpt").is_file()
    main(["fit", f"--config={DISTILL_MNIST}", *common, "--model.init_args.lr_scheduler.init_args.warmup_steps=2"])

    run = tmp_path / "lightning_logs" / "mnist_lenet_to_mlp" / "version_0"
    logged = scalars(run)
    assert {"train/kd_loss", "train/ce_loss", "val/acc", "test/acc"} <= set(logged)
    assert logged["test/acc"][-1] > 0.5  # the fake digits are learnable: far above chance (0.1)
    histograms = read_run(run).Tags()["histograms"]
    assert "weights/backbone.1.weight" in histograms and not any("teacher" in t for t in histograms)
    best = run / "checkpoints" / "best.ckpt"
    assert not any(k.startswith("teacher.") for k in torch.load(best, weights_only=True)["state_dict"])

    result = run_project(
        ["test", f"--config={REPO / 'configs' / 'mnist_mlp.yaml'}", "--model.init_args.arch_kwargs={hidden: [64]}",
         f"--data.data_dir={fake_mnist_dir}", "--data.val_size=128", "--trainer.accelerator=cpu", f"--ckpt_path={best}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = scalars(tmp_path / "lightning_logs" / "mnist_mlp" / "version_0")
    assert fresh["test/acc"][-1] == pytest.approx(logged["test/acc"][-1], abs=1e-6)


def test_cli_teacher_for_other_classes_is_a_one_line_error(fake_mnist_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    teacher = write_teacher_checkpoint(tmp_path / "t.ckpt", arch="mlp", arch_kwargs={"hidden": [8]})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={DISTILL_MNIST}", f"--data.data_dir={fake_mnist_dir}", "--data.classes=[3, 8]",
              f"--model.init_args.teacher_checkpoint={teacher}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_classes=10 but the data has num_classes=2" in err[0]


def test_teacher_overrides_fit_every_distillation_config(tmp_path) -> None:
    configs = sorted((REPO / "configs" / "distill").glob("*.yaml"))
    assert len(configs) >= 2
    for config in configs:
        (override,) = teacher_overrides(config, tmp_path / config.stem)
        assert Path(override.split("=", 1)[1]).is_file()
    assert teacher_overrides(REPO / "configs" / "mnist_lenet.yaml", tmp_path) == []
