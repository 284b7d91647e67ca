"""How the runtimes' threads and precision move the latencies ``compress`` reports, on one report's artifacts.

Times, at one batch size of real test images (CIFAR-10 JPEGs from ``--data-dir``): torch eager fp32, OpenVINO
int8 and ONNX Runtime int8 in turns (as ``compress`` times them) and each alone; OpenVINO at
``INFERENCE_PRECISION_HINT=f32`` (the project's) and at its default (bf16 float layers on CPUs with bf16 units);
ONNX Runtime with and without spinning threads, each session alone (spinning threads would slow the next turn).
Every figure is the median of ``--repeats`` calls after ``--warmup``. Last line: one JSON object.

    python scripts/profile_runtimes.py --artifacts lightning_logs/bench_deploy/<time>/compress/version_0/artifacts
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from agreement_by_margin import test_images  # noqa: E402
from bench_cifar_fast import extracted_folder  # noqa: E402

from project.compression.artifacts import load_runner  # noqa: E402
from project.compression.cpu import describe_cpu  # noqa: E402
from project.compression.measure import time_alternating  # noqa: E402
from project.runtime import keep_signal_stack  # noqa: E402


def _ms(fns: dict, warmup: int, repeats: int) -> dict[str, float]:
    return {k: round(v["ms"], 3) for k, v in time_alternating(fns, warmup=warmup, repeats=repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder with cifar10-jpg.tar.gz")
    parser.add_argument("--extract-dir", default=str(REPO / "data" / "cifar10-jpg"))
    parser.add_argument("--artifacts", required=True, help="a compress report's artifacts/ folder (fp32.pt2, int8.xml, ...)")
    parser.add_argument("--variant", default="int8", help="the int8 variant whose files are timed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import onnxruntime as ort
    import openvino as ov

    x = np.ascontiguousarray(test_images(extracted_folder(Path(args.data_dir), Path(args.extract_dir)), args.batch))
    a = Path(args.artifacts)
    runners = {"torch fp32": load_runner(a / "fp32.pt2"), f"openvino {args.variant}": load_runner(a / f"{args.variant}.xml"),
               f"onnxruntime {args.variant}": load_runner(a / f"{args.variant}.onnx")}
    fns = {k: (lambda r=r: r(x)) for k, r in runners.items()}
    out = {"machine": describe_cpu(), "batch": args.batch, "in_turns": _ms(fns, args.warmup, args.repeats),
           "alone": {k: _ms({k: f}, args.warmup, args.repeats)[k] for k, f in fns.items()}}
    core, precision = ov.Core(), {}
    for name in ("fp32", args.variant):
        for hint, config in (("f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("default", {})):
            with keep_signal_stack():
                model = core.compile_model(str(a / f"{name}.xml"), "CPU", config)
            precision[f"openvino {name} {hint}"] = lambda m=model: m(x)
    out["openvino_precision"] = _ms(precision, args.warmup, args.repeats)
    out["onnxruntime_spinning"] = {}
    for name in ("fp32", args.variant):
        for spin in ("0", "1"):
            options = ort.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", spin)
            session = ort.InferenceSession(str(a / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x}
            key = f"onnxruntime {name} spinning={'on' if spin == '1' else 'off'}"
            out["onnxruntime_spinning"][key] = _ms({key: lambda s=session, f=feed: s.run(None, f)}, args.warmup, args.repeats)[key]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
