"""The export command (compress's deployment preset): ONNX and OpenVINO models, fp32 and post-training int8, that
run in their runtime alone."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("nncf")

from project.cli import main as cli_main  # noqa: E402
from project.commands.export import main as export_main  # noqa: E402
from project.commands.export import run as export_run  # noqa: E402
from project.compression import artifacts, deploy  # noqa: E402
from project.errors import UserError  # noqa: E402
from tests.commands.conftest import FAST  # noqa: E402
from tests.conftest import REPO  # noqa: E402

LENET = str(REPO / "configs" / "mnist_lenet.yaml")


@pytest.fixture(scope="module")
def exported(fake_mnist_dir: Path, lenet_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("export")
    return export_run([f"--config={LENET}", f"--ckpt={lenet_ckpt}", f"--out={out}", "--calibration-images=64",
                       "--batch-sizes=1,8", "--warmup=1", "--repeats=3", f"--data.data_dir={fake_mnist_dir}", *FAST])


def test_every_model_is_written_and_agrees_with_pytorch(exported: dict) -> None:
    folder = Path(exported["folder"])
    models = exported["variants"]
    assert {v: list(r) for v, r in models.items()} == {"fp32": ["onnxruntime", "openvino"],
                                                       "ptq": ["onnxruntime", "openvino"]}
    assert json.loads((folder / "report.json").read_text())["variants"] == models
    for name in ("fp32.onnx", "ptq.onnx", "fp32.xml", "fp32.bin", "ptq.xml", "ptq.bin"):
        assert (folder / "artifacts" / name).is_file(), name
    assert not list(folder.glob("artifacts/*.pt2"))  # no torch runtime asked for: no .pt2 shipped
    assert models["fp32"]["onnxruntime"]["accuracy"] > 0.5  # the checkpoint learned the fake digits
    for runtime, row in models["fp32"].items():  # the same computation in another runtime
        assert row["agreement"] >= 0.99 and row["parity"] == row["agreement"] and not row["drift"], runtime
    for runtime, row in models["ptq"].items():
        assert row["agreement"] >= 0.9, (runtime, row)
        assert row["file_bytes"] < 0.5 * models["fp32"][runtime]["file_bytes"]
    assert exported["reduce_range"] == "auto" and exported["drift"] == []
    for name, row in ((f"{v} / {r}", row) for v, rows in models.items() for r, row in rows.items()):
        assert row["latency_ms_b1"] > 0 and row["latency_ms_b8"] > 0 and row["latency_ms_b8_iqr"] >= 0, name
    assert set(exported["fastest_runtime"]["8"]) == {"fp32", "ptq"}


def test_reduce_range_follows_the_cpu_and_is_recorded(exported: dict, monkeypatch) -> None:
    import onnx

    model = onnx.load(str(Path(exported["folder"]) / "artifacts" / "ptq.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["reduce_range"] == str(not deploy.cpu_has_vnni()).lower()
    fp32 = {p.key: p.value for p in onnx.load(str(Path(exported["folder"]) / "artifacts" / "fp32.onnx")).metadata_props}
    contract = json.loads(fp32["input_contract"])
    assert contract["range"] == [0.0, 1.0] and contract["normalization_inside"]["mean"] == [0.1307]
    monkeypatch.setattr(deploy.Path, "read_text", lambda self: "flags\t: fpu avx2 avx512_vnni\n")
    assert deploy.cpu_has_vnni()
    monkeypatch.setattr(deploy.Path, "read_text", lambda self: "flags\t: fpu avx2 fma\n")
    assert not deploy.cpu_has_vnni()


# A process with only the runtimes and numpy: the test images come from the IDX files, scaled to [0, 1].
_FRESH = """
import json, sys, numpy as np
raw, paths = sys.argv[1], sys.argv[2:]
def idx(name):
    data = open(raw + "/" + name, "rb").read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
images = (idx("t10k-images-idx3-ubyte")[:, None] / 255.0).astype(np.float32)
labels = idx("t10k-labels-idx1-ubyte")
out = {}
for path in paths:
    if path.endswith(".onnx"):
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    else:
        import openvino as ov
        logits = ov.Core().compile_model(path, "CPU")(images)[0]
    out[path] = float((logits.argmax(-1) == labels).mean())
assert "torch" not in sys.modules and not any(m.startswith("project") for m in sys.modules), "not a bare runtime"
print(json.dumps(out))
"""


def test_models_run_in_their_runtime_alone_with_the_reported_accuracy(exported: dict, fake_mnist_dir: Path) -> None:
    folder = Path(exported["folder"])
    names = {("fp32", "onnxruntime"): "fp32.onnx", ("ptq", "onnxruntime"): "ptq.onnx",
             ("fp32", "openvino"): "fp32.xml", ("ptq", "openvino"): "ptq.xml"}
    paths = {name: str(folder / "artifacts" / file) for name, file in names.items()}
    out = subprocess.run([sys.executable, "-c", _FRESH, str(fake_mnist_dir / "MNIST" / "raw"), *paths.values()],
                         capture_output=True, text=True, timeout=300, cwd=folder)
    assert out.returncode == 0, out.stderr[-2000:]
    accuracy = json.loads(out.stdout.strip().splitlines()[-1])
    for name, path in paths.items():
        assert accuracy[path] == pytest.approx(exported["variants"][name[0]][name[1]]["accuracy"], abs=1e-9), name


@pytest.mark.parametrize("name", ["fp32.onnx", "ptq.xml"])
def test_predict_runs_each_format(exported: dict, name: str, fake_mnist_dir: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli_main(["predict", f"--config={LENET}", f"--ckpt_path={Path(exported['folder']) / 'artifacts' / name}",
              f"--data.data_dir={fake_mnist_dir}", *FAST])
    (csv,) = tmp_path.glob("lightning_logs/mnist_lenet/version_*/predictions.csv")
    rows = csv.read_text().splitlines()
    assert rows[0] == "index,pred,prob" and len(rows) == 1 + 128


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_corrupt_model_is_one_clear_line(exported: dict, suffix: str, tmp_path) -> None:
    source = Path(exported["folder"]) / "artifacts" / f"fp32{suffix}"
    broken = tmp_path / f"broken{suffix}"
    broken.write_bytes(source.read_bytes()[: len(source.read_bytes()) // 3])
    if suffix == ".xml":
        (tmp_path / "broken.bin").write_bytes((source.with_suffix(".bin")).read_bytes())
    with pytest.raises(UserError, match="unreadable") as err:
        artifacts.load_runner(broken)(np.zeros((1, 1, 28, 28), dtype=np.float32))
    assert "\n" not in str(err.value)


def test_bad_input_is_one_line(capsys, lenet_ckpt: Path, tmp_path: Path) -> None:
    for argv, expected in (
        ([f"--config={LENET}", f"--ckpt={lenet_ckpt}", "--runtimes=tflite"], "tflite"),
        ([f"--config={LENET}", f"--ckpt={lenet_ckpt}", "--calibration-images=4"], "calibration"),
        ([f"--config={tmp_path / 'missing.yaml'}", f"--ckpt={lenet_ckpt}"], "does not exist"),
        ([f"--config={LENET}", f"--ckpt={lenet_ckpt}", "--batch-sizes=1,x"], "batch-sizes"),
    ):
        with pytest.raises(SystemExit) as exc:
            export_main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


def test_a_missing_runtime_is_one_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without it gives import
    with pytest.raises(UserError, match="pip install openvino") as err:
        deploy.require("openvino")
    assert "\n" not in str(err.value)


def test_export_is_compress_with_deployment_defaults() -> None:
    from project.commands.export import compress_argv

    base = ["--config=c.yaml", "--ckpt=m.ckpt"]
    assert compress_argv(base)[-3:] == ["--variants=fp32,ptq", "--runtimes=onnxruntime,openvino", "--name=export"]
    assert compress_argv([*base, "--no-int8"]) == [*base, "--variants=fp32", "--runtimes=onnxruntime,openvino",
                                                   "--name=export"]
    argv = compress_argv([*base, "--variants", "fp32,int8", "--runtimes=onnxruntime", "--data.data_dir=d"])
    assert argv[-3:] == ["--variants=fp32,int8", "--runtimes=onnxruntime", "--name=export"] and "--data.data_dir=d" in argv
