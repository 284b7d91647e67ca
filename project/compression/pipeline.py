"""From a compressed network to the files a user deploys, in every runtime, and each file measured the same way.

A *variant* is one PyTorch network (float, pruned, or prepared for int8 with fake-quant modules) plus how its
int8 model is made. :func:`write_artifacts` ships it in each runtime asked for, through the one registry
(:mod:`project.compression.artifacts`):

============  =================================================================================================
runtime       artifact
============  =================================================================================================
torch         ``<variant>.pt2``: the ``torch.export`` program, run eager (float, pruned, or int8 from torchao)
torch.compile the same ``.pt2`` through ``torch.compile`` with weight freezing (oneDNN int8 kernels on x86)
onnxruntime   ``<variant>.onnx``: that program exported to ONNX (int8 as QDQ with the program's own scales); for
              ``ptq``, ONNX Runtime's own static int8 of the fp32 model
openvino      ``<variant>.xml`` + ``.bin``: OpenVINO IR of that ONNX model; for ``ptq``, NNCF's int8 of the fp32 model
============  =================================================================================================

:func:`measure` loads every file back from disk and measures each alike: test accuracy, agreement with the fp32
PyTorch network, *parity* (agreement with the PyTorch network the file was made from), learned tensors and MACs
(of the variant's network, the same in every runtime), bytes on disk and gzipped, and latency at each batch size
with every file timed in turns. An artifact whose parity falls below its bound is *drift*.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from project.compression import artifacts, deploy
from project.compression import measure as M
from project.compression import quantization as Q
from project.compression.export import save_program
from project.errors import UserError

RUNTIMES = ("torch", "torch.compile", "onnxruntime", "openvino")
#: Packages each runtime needs (``onnx``/``onnxscript`` for the export; OpenVINO reads the exported ONNX).
PACKAGES = {"torch": (), "torch.compile": (), "onnxruntime": ("onnxruntime", "onnxscript"),
            "openvino": ("openvino", "onnxscript")}
#: Packages the post-training int8 of each runtime needs (``torch``'s is torchao, required by the project).
PTQ_PACKAGES = {"onnxruntime": ("onnxruntime.quantization",), "openvino": ("nncf",)}
#: Default parity bounds: the share of test images on which an artifact must predict what its PyTorch source does.
MIN_AGREEMENT_FLOAT = 0.999  # nothing quantized in between: the same computation in another runtime
MIN_AGREEMENT_INT8 = 0.98  # float (or fake-quant) source -> int8 kernels


def missing_packages(runtime: str, ptq: bool = False) -> list[str]:
    """The packages ``runtime`` needs (and its PTQ, if asked) that are not installed."""
    needed = PACKAGES[runtime] + (PTQ_PACKAGES.get(runtime, ()) if ptq else ())
    return [p for p in needed if _find(p) is None]


def _find(package: str) -> Any:
    try:
        return importlib.util.find_spec(package)
    except ModuleNotFoundError:  # a parent package is missing
        return None


def choose_runtimes(asked: Sequence[str] | None, ptq: bool, log: Callable[[str], None] = print) -> list[str]:
    """The runtimes to build and measure: ``asked`` (each must be installed), or every installed one, each
    missing one skipped with one line."""
    if asked is not None:
        for runtime in asked:
            missing = missing_packages(runtime, ptq)
            if missing:
                raise UserError(f"runtime {runtime} needs {', '.join(missing)}, which is not installed: "
                                f"pip install {' '.join(p.split('.')[0] for p in missing)}, or leave it out of --runtimes")
        return list(asked)
    chosen = []
    for runtime in RUNTIMES:
        missing = missing_packages(runtime, ptq)
        if missing:
            log(f"compress: {runtime} skipped: {', '.join(missing)} not installed")
        else:
            chosen.append(runtime)
    return chosen


@dataclass
class Variant:
    """One compressed network and the files it ships as.

    ``source`` is the PyTorch network the files are made from, taking normalised images (float, pruned or
    fake-quant); ``quantized``: whether int8 happens between it and the files (the parity bound is then the
    int8 one). ``files`` maps each runtime to its artifact; ``counts`` are the network's learned tensors,
    non-zeros and MACs, the same in every runtime.
    """

    name: str
    source: nn.Module
    quantized: bool
    files: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)


def write_artifacts(
    name: str, source: nn.Module, program_net: nn.Module | None, runtimes: Sequence[str], folder: Path,
    input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
    calibration: np.ndarray | None = None, quantized: bool = False, reduce_range: bool | None = None,
) -> Variant:
    """Ship one variant in ``runtimes`` under ``folder``.

    ``program_net`` is what the ``.pt2`` holds (the converted int8 model for QAT and PTQ, else the float network;
    ``None`` where torchao cannot quantize the network: no ``.pt2``, so ``runtimes`` must not hold torch ones).
    The ``.pt2`` is kept only when a torch runtime is asked for; otherwise it is only the source of the ONNX model.
    ``calibration`` ([0, 1] training images) marks post-training int8: ONNX Runtime and OpenVINO then quantize the
    float ``source`` themselves instead of exporting the torchao program (``reduce_range``: ONNX Runtime's 7-bit
    weights; ``None`` chooses from the CPU).
    """
    if program_net is None and calibration is None:
        raise ValueError("only post-training int8 (calibration given) can ship without a .pt2")
    variant = Variant(name, source, quantized or calibration is not None)
    example = torch.rand(1, *input_shape)
    torch_runtimes = [r for r in runtimes if r in ("torch", "torch.compile")]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if program_net is None:
            normalised = (example - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
            variant.counts = _counts(source, normalised)
        else:
            program = save_artifact(program_net, input_shape, folder if torch_runtimes else scratch, name, mean, std)
            variant.counts = network_counts(program, example)
            variant.files.update({r: program for r in torch_runtimes})
        if not {"onnxruntime", "openvino"} & set(runtimes):
            pass
        elif calibration is None:  # the program itself: pruned, or int8 with its own scales
            onnx = deploy.program_to_onnx(program, (folder if "onnxruntime" in runtimes else scratch) / f"{name}.onnx")
            if "onnxruntime" in runtimes:
                variant.files["onnxruntime"] = onnx
        else:  # post-training int8: each runtime quantizes the float network with its own tool
            onnx = deploy.export_onnx(source, input_shape, scratch / "fp32.onnx", mean, std)
            if "onnxruntime" in runtimes:
                variant.files["onnxruntime"] = deploy.quantize_onnx(onnx, folder / f"{name}.onnx", calibration,
                                                                    reduce_range)
        if "openvino" in runtimes:
            variant.files["openvino"] = deploy.convert_openvino(onnx, folder / f"{name}.xml", calibration)
    variant.files = {r: variant.files[r] for r in runtimes if r in variant.files}
    return variant


def save_artifact(
    net: nn.Module, input_shape: Sequence[int], folder: Path, name: str, mean: Sequence[float], std: Sequence[float]
) -> Path:
    """Write ``net`` as the file a user would ship: ``<folder>/<name>.pt2``, int8 when it was prepared for QAT."""
    if Q.fake_quantizers(net):
        net = Q.convert_copy(net)
    else:
        net = copy.deepcopy(net).cpu().eval()
    return save_program(net, input_shape, folder / f"{name}.pt2", mean, std)


# ---- measuring -------------------------------------------------------------------------------------


def predict(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int) -> np.ndarray:
    """Top-1 predictions over ``images`` in chunks of ``batch`` (the last one padded: one shape for compiled models)."""
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        out.append(np.asarray(fn(chunk)).argmax(-1)[: len(images) - start])
    return np.concatenate(out)


def source_runner(net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> Callable[[np.ndarray], np.ndarray]:
    """A PyTorch network taking normalised images as a runner over [0, 1] numpy images (eval mode, no autograd)."""
    from project.compression.export import with_input_normalization

    model = with_input_normalization(net.cpu(), mean, std)
    net.eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).numpy()

    return run


def network_counts(program: Path, image: torch.Tensor) -> dict[str, Any]:
    """Learned tensors, non-zeros, sparsity and MACs of one image ([0, 1]), read from a variant's ``.pt2``."""
    from project.compression.export import load_program

    return _counts(load_program(program), image)


def _counts(module: nn.Module, image: torch.Tensor) -> dict[str, Any]:
    params, nonzero = M.count_parameters(module), M.count_nonzero(module)
    return {"params": params, "nonzero": nonzero, "sparsity": 1.0 - nonzero / params if params else 0.0,
            "macs": M.count_macs(module, image[:1])}


def measure(
    variants: Sequence[Variant], images: np.ndarray, labels: np.ndarray, reference: nn.Module,
    mean: Sequence[float], std: Sequence[float], batch_sizes: Sequence[int], warmup: int, repeats: int,
    min_agreement: tuple[float, float] = (MIN_AGREEMENT_FLOAT, MIN_AGREEMENT_INT8), log: Callable[[str], None] = print,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{variant: {runtime: figures}}`` for every artifact, each loaded back from disk (see the module docstring).

    ``reference``: the fp32 PyTorch network (normalised input), whose predictions ``agreement`` compares with;
    ``min_agreement``: the (float, int8) parity bounds. No timing when ``batch_sizes`` is empty.
    """
    chunk = max(batch_sizes, default=64)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    runners: dict[tuple[str, str], Callable[[np.ndarray], np.ndarray]] = {}
    predicted: dict[int, np.ndarray] = {}  # PyTorch predictions per network: fp32 and ptq share theirs

    def source_predictions(net: nn.Module) -> np.ndarray:
        if id(net) not in predicted:
            predicted[id(net)] = predict(source_runner(net, mean, std), images, 256)
        return predicted[id(net)]

    reference_pred = source_predictions(reference)
    for v in variants:
        counts = v.counts
        source_pred = source_predictions(v.source)
        bound = min_agreement[1] if v.quantized else min_agreement[0]
        results[v.name] = {}
        for runtime, path in v.files.items():
            log(f"  {v.name} in {runtime}: {path.name}")
            runner = artifacts.load_runner(path, compile=runtime == "torch.compile")
            pred = predict(runner, images, chunk)
            size, gzipped = artifacts.artifact_bytes(path), artifacts.artifact_gzip_bytes(path)
            parity = float((pred == source_pred).mean())
            results[v.name][runtime] = {
                "artifact": path.name, "accuracy": float((pred == labels).mean()),
                "agreement": float((pred == reference_pred).mean()), "parity": parity, "parity_bound": bound,
                "drift": parity < bound, **counts, "file_bytes": size, "gzip_bytes": gzipped,
            }
            runners[(v.name, runtime)] = runner
    for batch in batch_sizes:
        x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])), dtype=np.float32)
        log(f"  latency at batch {batch}: {len(runners)} artifacts in turns, {warmup} warm-up + {repeats} timed calls each")
        timed = M.time_alternating({k: (lambda r=r: r(x)) for k, r in runners.items()}, warmup=warmup, repeats=repeats)
        for (name, runtime), t in timed.items():
            results[name][runtime][f"latency_ms_b{batch}"] = t["ms"]
            results[name][runtime][f"latency_ms_b{batch}_iqr"] = t["iqr_ms"]
            if t["spread"] > 0.25:
                log(f"  {name} in {runtime} at batch {batch} varied widely (IQR {t['iqr_ms']:.3f} ms around "
                    f"{t['ms']:.3f} ms): the machine was busy; measure again")
    return results
