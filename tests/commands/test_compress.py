"""The compress report command: every variant built, saved, reloaded, measured and reported; bad input."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from project.commands.compress import main as compress_main
from project.commands.compress import run as compress_run
from project.compression import report as R
from project.compression.export import load_program
from project.tasks import ImageClassifier
from tests.commands.conftest import FAST
from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VARIANTS = ["fp32", "unstructured", "structured", "ptq", "int8", "pruned_int8"]
# every runtime but torch.compile, whose compilation per variant and batch size would double the module's time
RUNTIMES = ["torch", "onnxruntime", "openvino"]
@pytest.fixture(scope="module")
def report(fake_mnist_dir: Path, lenet_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("reports")
    return compress_run([f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--ckpt={lenet_ckpt}", f"--out={out}",
                         "--finetune-epochs=1", "--distill", f"--runtimes={','.join(RUNTIMES)}", "--warmup=1", "--repeats=3",
                         "--batch-sizes=1,8",
                         f"--data.data_dir={fake_mnist_dir}", *FAST])


def test_report_end_to_end(report: dict) -> None:
    folder = Path(report["folder"])
    assert folder.name == "version_0" and folder.parent.name == "compress"
    on_disk = json.loads((folder / "report.json").read_text())
    variants = on_disk["variants"]
    assert list(variants) == VARIANTS
    md = (folder / "report.md").read_text()
    for name, runtimes in variants.items():
        assert list(runtimes) == RUNTIMES, name  # one row per variant x runtime
        for runtime, r in runtimes.items():
            assert f"| {name} / {runtime} |" in md
            assert (folder / "artifacts" / r["artifact"]).is_file()
            assert 0.0 <= r["accuracy"] <= 1.0
            assert 0 < r["nonzero"] <= r["params"]
            assert r["macs"] > 0 and r["file_bytes"] > 0 and r["gzip_bytes"] > 0
            assert r["latency_ms_b1"] > 0 and r["latency_ms_b8"] > 0
            assert not r["drift"] and r["parity"] >= r["parity_bound"], (name, runtime, r)
    assert on_disk["drift"] == [] and set(on_disk["fastest_runtime"]["8"]) == set(VARIANTS)
    assert on_disk["pareto_front"] and all(" / " in row for row in on_disk["pareto_front"])
    fp32, uns, st, i8, pi8 = (variants[k]["torch"] for k in ["fp32", "unstructured", "structured", "int8", "pruned_int8"])
    assert on_disk["test_images"] == 128
    # the checkpoint trained on the learnable fake data: fp32 is far above chance (10%)
    assert fp32["accuracy"] > 0.5
    # unstructured: same shapes, ~90% of conv/linear weights zero -> far fewer non-zeros, smaller gzip
    assert uns["params"] == fp32["params"] and uns["nonzero"] < 0.2 * fp32["params"]
    assert uns["gzip_bytes"] < 0.5 * fp32["gzip_bytes"]
    # structured: really smaller and cheaper
    assert st["params"] < 0.6 * fp32["params"] and st["macs"] < 0.6 * fp32["macs"]
    # int8: same MACs, a smaller file; pruned+int8 smaller still
    assert i8["macs"] == fp32["macs"] and i8["file_bytes"] < fp32["file_bytes"]
    assert pi8["file_bytes"] < i8["file_bytes"] and pi8["params"] == st["params"]
    # ptq: int8 without training, from the checkpoint as is: same MACs, int8-sized, close to fp32 (QAT recovers more)
    ptq = variants["ptq"]["torch"]
    assert ptq["macs"] == fp32["macs"] and ptq["file_bytes"] < 0.5 * fp32["file_bytes"]
    assert ptq["accuracy"] >= fp32["accuracy"] - 0.05
    for runtime in ("onnxruntime", "openvino"):
        # the compressed networks reach the other runtimes compressed: shrunk, with their zeros, in int8
        row = {k: variants[k][runtime] for k in VARIANTS}
        assert row["fp32"]["agreement"] >= 0.999 and row["structured"]["file_bytes"] < 0.6 * row["fp32"]["file_bytes"]
        assert row["unstructured"]["gzip_bytes"] < 0.5 * row["fp32"]["gzip_bytes"]
        for name, float_name, ratio in (("ptq", "fp32", 0.5), ("int8", "fp32", 0.5), ("pruned_int8", "structured", 0.75)):
            # int8 weights (the QDQ graph's own bytes weigh more beside the small pruned network's weights)
            assert row[name]["file_bytes"] < ratio * row[float_name]["file_bytes"], (runtime, name)
        # QAT's learned scales travel: ONNX Runtime and OpenVINO predict what the PyTorch int8 program predicts
        for name in ("int8", "pruned_int8"):
            assert row[name]["accuracy"] == pytest.approx(variants[name]["torch"]["accuracy"], abs=0.02), (runtime, name)


def test_plots_are_valid_png(report: dict) -> None:
    folder = Path(report["folder"])
    for name in ("accuracy_vs_size.png", "accuracy_vs_latency.png"):
        path = folder / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0  # something is drawn


# Run in a process that imports neither torch's project nor its DataModules: the test images are read from the
# IDX files with the standard library, scaled to [0, 1] as the input contract says, and fed to each program.
_FRESH = """
import gzip, json, struct, sys, torch, torchao.quantization.pt2e
raw = sys.argv[1]
def idx(name):
    data = open(raw + "/" + name, "rb").read()
    data = gzip.decompress(data) if data[:2] == b"\\x1f\\x8b" else data
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)
images = idx("t10k-images-idx3-ubyte").unsqueeze(1).float() / 255
labels = idx("t10k-labels-idx1-ubyte").long()
out = {}
for path in sys.argv[2:]:
    extra = {"input.json": ""}
    program = torch.export.load(path, extra_files=extra)
    with torch.no_grad():
        pred = program.module()(images).argmax(-1)
    out[path] = {"acc": (pred == labels).float().mean().item(), "contract": json.loads(extra["input.json"])}
assert not any(m.startswith("project") for m in sys.modules)
print(json.dumps(out))
"""


def test_artifacts_reload_in_fresh_process_on_unit_images_with_the_reported_accuracy(report: dict, fake_mnist_dir: Path) -> None:
    """Every shipped file loads with torch alone (int8 after importing torchao), takes [0, 1] images, carries its
    input contract, and gets the test accuracy the report gives for it."""
    folder = Path(report["folder"])
    paths = {name: str(folder / "artifacts" / r["torch"]["artifact"]) for name, r in report["variants"].items()}
    assert len(paths) == 6 and all(p.endswith(".pt2") for p in paths.values())
    raw = str(fake_mnist_dir / "MNIST" / "raw")
    out = subprocess.run([sys.executable, "-c", _FRESH, raw, *paths.values()], capture_output=True, text=True, timeout=300,
                         cwd=folder, env={"PATH": "/usr/bin:/bin", "HOME": str(folder)})
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for name, path in paths.items():
        assert results[path]["acc"] == pytest.approx(report["variants"][name]["torch"]["accuracy"], abs=1e-9), name
        contract = results[path]["contract"]
        assert contract["range"] == [0.0, 1.0] and contract["channels"] == 1 and contract["height"] == 28
        assert contract["normalization_inside"] == {"mean": [0.1307], "std": [0.3081]}


def test_unstructured_artifact_keeps_pruned_zeros(report: dict) -> None:
    folder = Path(report["folder"])
    program = load_program(folder / "artifacts" / report["variants"]["unstructured"]["torch"]["artifact"])
    weights = [v for k, v in program.state_dict().items() if k.endswith("weight") and v.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert 0.85 < zeros / total < 0.95  # 90% global sparsity of conv/linear weights


def test_new_version_folder_every_time(tmp_path: Path) -> None:
    assert R.next_version_dir(tmp_path, "compress").name == "version_0"
    assert R.next_version_dir(tmp_path, "compress").name == "version_1"


def _error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        compress_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_missing_checkpoint_is_one_line(capsys, tmp_path: Path, fake_mnist_dir: Path) -> None:
    line = _error_line(capsys, [f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--ckpt={tmp_path / 'nope.ckpt'}",
                                f"--out={tmp_path}", f"--data.data_dir={fake_mnist_dir}"])
    assert "does not exist" in line


def test_checkpoint_of_another_arch_is_one_line(capsys, tmp_path: Path, fake_mnist_dir: Path) -> None:
    # a Lightning-style checkpoint of the mlp architecture, as a fit of configs/mnist_mlp.yaml writes it
    mlp = ImageClassifier(num_classes=10, arch="mlp")
    mlp_ckpt = tmp_path / "mlp.ckpt"
    torch.save({"state_dict": mlp.state_dict(), "hyper_parameters": dict(mlp.hparams)}, mlp_ckpt)
    line = _error_line(capsys, [f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--ckpt={mlp_ckpt}",
                                f"--out={tmp_path}", f"--data.data_dir={fake_mnist_dir}"])
    assert "'mlp'" in line and "'lenet5'" in line


def test_bad_variant_is_one_line(capsys, tmp_path: Path, lenet_ckpt: Path) -> None:
    line = _error_line(capsys, [f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--ckpt={lenet_ckpt}",
                                "--variants=fp32,fp16"])
    assert "fp16" in line


def test_unknown_runtime_is_one_line(capsys, tmp_path: Path, lenet_ckpt: Path) -> None:
    line = _error_line(capsys, [f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--ckpt={lenet_ckpt}",
                                "--runtimes=torch,tensorrt"])
    assert "tensorrt" in line and "onnxruntime" in line


def test_a_drifted_artifact_fails_the_command_naming_it(capsys, monkeypatch, tmp_path: Path, fake_mnist_dir: Path,
                                                        lenet_ckpt: Path) -> None:
    """ONNX Runtime's int8 model with one activation scale corrupted: the report is written, drift named, exit 2;
    ``--allow-drift`` keeps the same report and exits 0."""
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from project.compression import deploy

    real = deploy.quantize_onnx

    def corrupted(*args, **kwargs):
        path = real(*args, **kwargs)
        model = onnx.load(str(path))
        quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][1]
        scale = next(i for i in model.graph.initializer if i.name == quantize.input[1])
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 50, scale.name))
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(deploy, "quantize_onnx", corrupted)
    argv = [f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--ckpt={lenet_ckpt}", f"--out={tmp_path}",
            "--variants=fp32,ptq", "--runtimes=torch,onnxruntime", "--calibration-images=64", "--batch-sizes=4",
            "--warmup=0", "--repeats=1", f"--data.data_dir={fake_mnist_dir}", *FAST]
    line = _error_line(capsys, argv)
    assert line.startswith("error: drift: ptq in onnxruntime agrees with its PyTorch source on") and "--allow-drift" in line
    folder = tmp_path / "compress" / "version_0"
    on_disk = json.loads((folder / "report.json").read_text())
    assert on_disk["variants"]["ptq"]["onnxruntime"]["drift"] and not on_disk["variants"]["ptq"]["torch"]["drift"]
    assert "ptq in onnxruntime" in (folder / "report.md").read_text().split("## Drift")[1]
    kept = compress_run([*argv, "--allow-drift"])
    assert kept["drift"] and Path(kept["folder"]).name == "version_1"


def _nothing_written(out: Path) -> bool:
    return not list(out.glob("compress/version_*"))


def test_a_qat_or_exported_model_as_the_source_is_one_line(capsys, tmp_path: Path, fake_mnist_dir: Path) -> None:
    from project.compression import quantization as Q

    pytest.importorskip("torchao")
    model = ImageClassifier(num_classes=10, arch="lenet5")
    model.net = Q.prepare_qat(model.net, (1, 28, 28))  # what a QAT run's checkpoints hold: fake-quant state
    qat_ckpt = tmp_path / "qat.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, qat_ckpt)
    program = tmp_path / "model.pt2"
    program.write_bytes(b"PK")
    lenet = f"--config={REPO / 'configs/mnist_lenet.yaml'}"
    capsys.readouterr()  # torch's own warnings while preparing the QAT network
    for ckpt, expected in ((qat_ckpt, "quantization-aware training: compress and export start from a float"),
                           (program, "is an exported model")):
        line = _error_line(capsys, [lenet, f"--ckpt={ckpt}", f"--out={tmp_path}", f"--data.data_dir={fake_mnist_dir}"])
        assert expected in line, line
    assert _nothing_written(tmp_path)


def test_a_network_a_runtime_cannot_export_is_one_line_and_leaves_nothing(
        capsys, monkeypatch, tmp_path: Path, fake_mnist_dir: Path, lenet_ckpt: Path) -> None:
    pytest.importorskip("onnxruntime")
    from project.compression import deploy
    from project.errors import UserError

    def refuses(program_path, path):
        raise UserError(f"{program_path.name} does not export to ONNX (an operator the exporter lacks)")

    monkeypatch.setattr(deploy, "program_to_onnx", refuses)
    line = _error_line(capsys, [f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--ckpt={lenet_ckpt}",
                                "--variants=fp32", "--runtimes=torch,onnxruntime", "--batch-sizes=", f"--out={tmp_path}",
                                f"--data.data_dir={fake_mnist_dir}", *FAST])
    assert "fp32.pt2 does not export to ONNX" in line
    assert _nothing_written(tmp_path)  # the folder with fp32.pt2 in it was removed


def test_fine_tuning_runs_use_a_fine_tuning_schedule_saved_in_their_config(report: dict) -> None:
    import yaml

    scratch = yaml.safe_load((REPO / "configs/mnist_lenet.yaml").read_text())["model"]["init_args"]
    assert scratch["lr_scheduler"]["class_path"].endswith("OneCycleLR")  # the from-scratch recipe, peak 0.004
    peak, lr = scratch["lr_scheduler"]["init_args"]["max_lr"], scratch["optimizer"]["init_args"]["lr"]
    for variant in ("unstructured", "structured", "int8", "pruned_int8"):
        (saved,) = (Path(report["folder"]) / "finetune" / variant).glob("version_*/config.yaml")
        model = yaml.safe_load(saved.read_text())["model"]["init_args"]
        assert model["lr_scheduler"]["class_path"].endswith("OneCycleLR"), variant  # its shape, a tenth of its LR
        assert model["lr_scheduler"]["init_args"]["max_lr"] == pytest.approx(0.1 * peak)
        assert model["optimizer"]["init_args"]["lr"] == pytest.approx(0.1 * lr)
    assert report["finetune_schedule"] == "the config's OneCycleLR schedule at 0.1 x its LR (peak 0.0004)"


def test_the_users_own_schedule_arguments_win() -> None:
    from types import SimpleNamespace as NS

    from project.commands.compress import finetune_schedule, parse_args

    config = NS(model=NS(init_args=NS(optimizer=NS(init_args=NS(lr=0.01)), lr_scheduler=NS(init_args=NS(max_lr=0.02)))))
    args, _ = parse_args([f"--config={REPO / 'configs/mnist_lenet.yaml'}", "--ckpt=x.ckpt", "--finetune-schedule=constant"])
    assert finetune_schedule(config, args, []) == (
        ["--model.init_args.optimizer.init_args.lr=0.002", "--model.init_args.lr_scheduler=null"],
        "constant LR from 0.002 (0.1 x the config's peak 0.02)")
    assert finetune_schedule(config, args, ["--model.init_args.optimizer.init_args.lr=0.5"])[0] == []
    args, _ = parse_args([f"--config={REPO / 'configs/mnist_lenet.yaml'}", "--ckpt=x.ckpt", "--finetune-schedule=cosine"])
    assert finetune_schedule(config, args, [])[0] == [
        "--model.init_args.optimizer.init_args.lr=0.002",
        '--model.init_args.lr_scheduler={"class_path": "project.tasks.WarmupCosineLR", "init_args": {"warmup_steps": 0}}']


def test_a_bad_fine_tuning_lr_scale_is_one_line(capsys, lenet_ckpt: Path) -> None:
    line = _error_line(capsys, [f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--ckpt={lenet_ckpt}",
                                "--finetune-lr-scale=0"])
    assert "--finetune-lr-scale" in line


def test_fine_tuning_runs_learn_from_the_checkpoint_and_never_save_the_teacher(report: dict, lenet_ckpt: Path) -> None:
    import yaml

    assert report["distilled_from"] == str(lenet_ckpt)
    for variant in ("unstructured", "structured", "int8", "pruned_int8"):
        (run,) = (Path(report["folder"]) / "finetune" / variant).glob("version_*")
        model = yaml.safe_load((run / "config.yaml").read_text())["model"]
        assert model["class_path"] == "project.tasks.distill.DistillationClassifier", variant
        assert model["init_args"]["teacher_checkpoint"] == str(lenet_ckpt)
        for ckpt in run.glob("checkpoints/*.ckpt"):
            state = torch.load(ckpt, weights_only=True)["state_dict"]
            assert state and not any(k.startswith("teacher.") for k in state), (variant, ckpt.name)


def test_distillation_only_when_asked_and_a_distilling_config_keeps_its_task() -> None:
    from types import SimpleNamespace as NS

    from project.commands.compress import distillation, parse_args

    lenet = f"--config={REPO / 'configs/mnist_lenet.yaml'}"
    plain = NS(model=NS(class_path="project.tasks.ImageClassifier"))
    assert distillation(plain, parse_args([lenet, "--ckpt=a.ckpt", "--distill"])[0]) == [
        "--model.class_path=project.tasks.distill.DistillationClassifier", "--model.init_args.teacher_checkpoint=a.ckpt"]
    assert distillation(plain, parse_args([lenet, "--ckpt=a.ckpt"])[0]) == []  # off unless asked
    own = NS(model=NS(class_path="project.tasks.distill.DistillationClassifier"))
    assert distillation(own, parse_args([lenet, "--ckpt=a.ckpt", "--distill"])[0]) == []


def test_building_a_run_does_not_warn_about_the_commands_own_arguments(monkeypatch, fake_mnist_dir: Path) -> None:
    import sys
    import warnings

    from project.commands.compress import _cli

    monkeypatch.setattr(sys, "argv", ["python -m project", "compress", "--config=x.yaml", "--ckpt=y.ckpt"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _cli([f"--config={REPO / 'configs/mnist_lenet.yaml'}", f"--data.data_dir={fake_mnist_dir}",
                    "--trainer.logger=false"])
    assert cli.model.hparams["arch"] == "lenet5"
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]
    assert sys.argv[1] == "compress"  # given back
