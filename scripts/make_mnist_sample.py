"""Write the MNIST sample shipped in project/data/assets/mnist_sample/ (used by MNISTSampleDataModule).

A seeded, class-balanced subset of the real MNIST files, as gzipped IDX files:

    python scripts/make_mnist_sample.py --data-dir ../shared/data --train 6000 --test 1000
"""

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from project.data.idx import write_idx  # noqa: E402
from project.data.mnist import FILES, SAMPLE_DIR, find_raw_file, read_idx  # noqa: E402

CREDIT = """# MNIST sample

A class-balanced subset of MNIST ({train} training and {test} test images, {train_per} and {test_per} per
digit, drawn with seed {seed}) in the original gzipped IDX format, written by `scripts/make_mnist_sample.py`.
`project.data.MNISTSampleDataModule` reads it, so examples and tests run offline.

MNIST by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, CC BY-SA 3.0
(http://yann.lecun.com/exdb/mnist/).
"""


def balanced_subset(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``per_class`` random images of each digit."""
    chosen = []
    for digit in range(10):
        members = (labels == digit).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO / ".." / "shared" / "data"), help="holds MNIST/raw/")
    parser.add_argument("--train", type=int, default=6000, help="training images (a multiple of 10)")
    parser.add_argument("--test", type=int, default=1000, help="test images (a multiple of 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(SAMPLE_DIR), help="written to OUT/MNIST/raw/")
    args = parser.parse_args()
    if args.train % 10 or args.test % 10:
        parser.error("--train and --test must be multiples of 10 (the sample is class-balanced)")
    raw_in = Path(args.data_dir) / "MNIST" / "raw"
    raw_out = Path(args.out) / "MNIST" / "raw"
    generator = torch.Generator().manual_seed(args.seed)
    summary = {}
    for train, count in ((True, args.train), (False, args.test)):
        image_name, label_name = FILES[train]
        paths = [find_raw_file(raw_in, name) for name in (image_name, label_name)]
        if None in paths:
            sys.exit(f"MNIST IDX files not found in {raw_in.resolve()}: pass --data-dir DIR holding MNIST/raw/")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        keep = balanced_subset(labels, count // 10, generator)
        write_idx(raw_out / f"{image_name}.gz", images[keep].numpy())
        write_idx(raw_out / f"{label_name}.gz", labels[keep].numpy())
        summary["train" if train else "test"] = len(keep)
    (Path(args.out) / "README.md").write_text(
        CREDIT.format(
            train=args.train, test=args.test, train_per=args.train // 10, test_per=args.test // 10, seed=args.seed
        )
    )
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    for p in sorted(raw_out.iterdir()):
        print(f"{p.relative_to(REPO) if p.is_relative_to(REPO) else p}: {p.stat().st_size} bytes")
    print(json.dumps({**summary, "bytes": size, "out": str(Path(args.out))}))


if __name__ == "__main__":
    main()
