"""Where an int8 model disagrees with its fp32 model, by the fp32 model's margin (top-1 minus top-2 logit).

Profiles a parity miss of ``python -m project compress``: reads ``fp32.<suffix>`` and ``<variant>.<suffix>``
from a report's ``artifacts/`` folder, runs both on the CIFAR-10 JPEG test images (``cifar10-jpg.tar.gz`` in
``--data-dir``) and prints, as one JSON line, the agreement overall and per margin band. Disagreements that
sit among the smallest margins are near-ties that any rounding flips (a network that has not learned much),
not a broken export.

    python scripts/agreement_by_margin.py --artifacts lightning_logs/bench_deploy/<time>/compress/version_1/artifacts
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_cifar_fast import extracted_folder  # noqa: E402

from project.compression.artifacts import load_runner  # noqa: E402


def test_images(folder: Path, count: int) -> np.ndarray:
    """``count`` test images spread over the classes, as float32 [N, 3, 32, 32] in [0, 1]."""
    files = sorted((folder / "test").glob("*/*.jpg"))
    files = files[:: max(1, len(files) // count)][:count]
    return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255 for f in files])


def profile(reference: np.ndarray, other: np.ndarray) -> dict:
    """Agreement of ``other``'s top-1 with ``reference``'s, overall and per band of the reference's margin."""
    ordered = np.sort(reference, axis=1)
    margin = ordered[:, -1] - ordered[:, -2]
    differs = reference.argmax(1) != other.argmax(1)
    edges = np.quantile(margin, [0.0, 0.1, 0.25, 0.5, 1.0])
    bands = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    return {
        "images": len(margin), "agreement": float(1 - differs.mean()), "median_margin": float(np.median(margin)),
        "median_margin_of_disagreements": float(np.median(margin[differs])) if differs.any() else None,
        "disagreements_in_lowest_10pct_margin": float((margin[differs] <= edges[1]).mean()) if differs.any() else None,
        "agreement_by_margin_band": {name: float(1 - differs[(margin >= lo) & (margin <= hi)].mean())
                                     for name, (lo, hi) in zip(("0-10%", "10-25%", "25-50%", "50-100%"), bands)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder with cifar10-jpg.tar.gz")
    parser.add_argument("--extract-dir", default=str(REPO / "data" / "cifar10-jpg"))
    parser.add_argument("--artifacts", required=True, help="a compress report's artifacts/ folder")
    parser.add_argument("--variant", default="ptq")
    parser.add_argument("--suffix", default=".onnx", help=".onnx (ONNX Runtime), .xml (OpenVINO) or .pt2")
    parser.add_argument("--images", type=int, default=10000)
    args = parser.parse_args()
    folder = extracted_folder(Path(args.data_dir), Path(args.extract_dir))
    images = test_images(folder, args.images)
    artifacts = Path(args.artifacts)
    outputs = []
    for name in ("fp32", args.variant):
        run = load_runner(artifacts / f"{name}{args.suffix}")
        outputs.append(np.concatenate([run(images[i : i + 250]) for i in range(0, len(images), 250)]))
    print(json.dumps({"variant": args.variant, "suffix": args.suffix, **profile(*outputs)}))


if __name__ == "__main__":
    main()
