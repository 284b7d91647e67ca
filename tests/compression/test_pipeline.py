"""Every variant in every runtime: the registry round-trips each format, QAT's scales reach ONNX Runtime and
OpenVINO, drift is caught, and runtimes that are not installed are named."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from project.compression import artifacts  # noqa: E402
from project.compression import pipeline as P  # noqa: E402
from project.compression import quantization as Q  # noqa: E402
from project.compression.report import drifted  # noqa: E402
from project.errors import UserError  # noqa: E402
from project.models.classifier import build_network  # noqa: E402

SHAPE = (3, 32, 32)
MEAN, STD = [0.5] * 3, [0.25] * 3


def _images(n: int = 96, seed: int = 0) -> np.ndarray:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)).numpy()


def _qat_network(reduce_range: bool) -> torch.nn.Module:
    """A BN CNN prepared for QAT, its observers and weights moved by a few steps on images like the test ones."""
    torch.manual_seed(0)
    prepared = Q.prepare_qat(build_network("cnn", 10, *SHAPE[:1], SHAPE[1]), SHAPE, reduce_range=reduce_range)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for step in range(4):
        x = (torch.from_numpy(_images(32, seed=10 + step)) - 0.5) / 0.25
        loss = prepared(x).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return prepared.eval()


def test_the_registry_round_trips_every_format(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network("cnn", 10, 3, 32).eval()
    images = _images(16)
    with torch.no_grad():
        expected = net((torch.from_numpy(images) - 0.5) / 0.25).numpy()
    variant = P.write_artifacts("fp32", net, net, P.RUNTIMES, tmp_path, SHAPE, MEAN, STD)
    assert {r: p.suffix for r, p in variant.files.items()} == {
        "torch": ".pt2", "torch.compile": ".pt2", "onnxruntime": ".onnx", "openvino": ".xml"}
    for runtime, path in variant.files.items():
        assert artifacts.is_artifact(path) and artifacts.RUNTIMES[path.suffix] in runtime
        logits = artifacts.load_runner(path, compile=runtime == "torch.compile")(images)
        np.testing.assert_allclose(logits, expected, atol=1e-4, err_msg=runtime)
    xml = variant.files["openvino"]
    assert artifacts.artifact_bytes(xml) == xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


@pytest.mark.parametrize("reduce_range", [False, True], ids=["full-range", "7-bit"])
def test_a_qat_model_runs_with_its_own_scales_in_onnxruntime_and_openvino(tmp_path: Path, reduce_range: bool) -> None:
    """The QDQ models carry the program's scales: their logits are the PyTorch int8 program's, not a fresh PTQ's.
    With 7-bit activations the ONNX model clamps as PyTorch does (without the Clip, images brighter than any seen
    in training made a quarter of the predictions differ)."""
    import onnx

    prepared = _qat_network(reduce_range)
    variant = P.write_artifacts("int8", prepared, prepared, ["torch", "onnxruntime", "openvino"], tmp_path, SHAPE,
                                MEAN, STD, quantized=True)
    images = _images(128, seed=1) * 1.5  # some beyond the range the observers saw
    reference = artifacts.load_runner(variant.files["torch"])(images)
    for runtime in ("onnxruntime", "openvino"):
        logits = artifacts.load_runner(variant.files[runtime])(images)
        agreement = (logits.argmax(-1) == reference.argmax(-1)).mean()
        assert agreement >= P.MIN_AGREEMENT_INT8, (runtime, agreement)
        assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max(), runtime
    model = onnx.load(str(variant.files["onnxruntime"]))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10  # activations and weights
    assert ("Clip" in ops) == reduce_range
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 4  # conv/linear weights stored as int8, not float
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["reduce_range"] == str(reduce_range).lower() and "input_contract" in meta


def test_a_corrupted_scale_is_drift(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    prepared = _qat_network(False)
    variant = P.write_artifacts("int8", prepared, prepared, ["torch", "onnxruntime"], tmp_path, SHAPE, MEAN, STD,
                                quantized=True)
    path = variant.files["onnxruntime"]
    model = onnx.load(str(path))
    quantize = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    scale = next(i for i in model.graph.initializer if i.name == quantize.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 20, scale.name))
    onnx.save(model, str(path))
    images = _images(64, seed=2)
    reference = P.predict(P.source_runner(prepared, MEAN, STD), images, 64)
    results = P.measure([variant], images, reference, prepared, MEAN, STD, [], 0, 1)
    assert not results["int8"]["torch"]["drift"]
    assert results["int8"]["onnxruntime"]["drift"]
    (line,) = drifted(results)
    assert line.startswith("int8 in onnxruntime agrees with its PyTorch source on") and "bound 98.0%" in line


def test_runtimes_not_installed_are_skipped_with_a_line_or_refused_when_asked(monkeypatch) -> None:
    real = P._find
    monkeypatch.setattr(P, "_find", lambda name: None if name.startswith("openvino") else real(name))
    said = []
    assert P.choose_runtimes(None, ptq=True, log=said.append) == ["torch", "torch.compile", "onnxruntime"]
    assert said == ["compress: openvino skipped: openvino not installed"]
    with pytest.raises(UserError, match="runtime openvino needs openvino, which is not installed: pip install openvino"):
        P.choose_runtimes(["torch", "openvino"], ptq=False)
    monkeypatch.setattr(P, "_find", lambda name: None if name == "nncf" else real(name))
    assert P.choose_runtimes(["openvino"], ptq=False) == ["openvino"]  # NNCF only for post-training int8
    with pytest.raises(UserError, match="needs nncf"):
        P.choose_runtimes(["openvino"], ptq=True)



_SIGNAL_AFTER_OPENVINO = """
import gc, os, signal, sys, time
import numpy as np
from project.compression.artifacts import load_runner
first, second = load_runner(sys.argv[1]), load_runner(sys.argv[1])  # two openvino.Core()s, two plugin engines
first(np.zeros((1, 3, 32, 32), np.float32))
del first; gc.collect(); del second; gc.collect()  # gone in the order they came: not last-in, first-out
signal.signal(signal.SIGUSR1, lambda *a: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)  # what a DataLoader worker's SIGCHLD does later in a test session
time.sleep(0.2)
print("alive")
"""


def test_a_signal_after_openvino_models_are_gone_is_handled(tmp_path: Path) -> None:
    """OpenVINO's CPU plugin leaves the thread on a freed alternate signal stack when two cores go in the order
    they came (project.runtime.keep_signal_stack); the next signal was a SIGSEGV that killed the test session."""
    import subprocess
    import sys

    from tests.conftest import REPO

    net = build_network("cnn", 10, 3, 32).eval()
    variant = P.write_artifacts("fp32", net, net, ["openvino"], tmp_path, SHAPE, MEAN, STD)
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _SIGNAL_AFTER_OPENVINO,
                          str(variant.files["openvino"])], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split() == ["handled", "alive"]
