"""How DDP runs end: the same 2-process CPU (gloo) fit, run many times in a row, each in a fresh process.

Each run is ``python -m project fit --config CONFIG --config configs/trainer/ddp_cpu.yaml --trainer.max_epochs 1``
with the progress bar on, as a user runs it. A run counts as an abort when its exit status is not 0, when its
stderr has ``terminate called`` (C++'s ``std::terminate``, which any rank may print), or when it left a core
file (``ulimit -c`` permitting, in the run's own folder, or under the folder ``--core-dir`` names, which must be
where ``/proc/sys/kernel/core_pattern`` points). The last line printed is one JSON object.

    python scripts/bench_ddp_exit.py --runs 30
    python scripts/bench_ddp_exit.py --runs 10 --config configs/mnist_lenet.yaml --data-dir ../shared/data

``--data-dir`` is passed to the config's DataModule (``--data.init_args.data_dir``) for every config but the
quick start, whose MNIST sample ships inside the package.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="consecutive fits (about 25 s each on 2 cores)")
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--core-dir", default=None, help="where the kernel writes core files, if not the cwd")
    parser.add_argument("--max-epochs", type=int, default=1)
    return parser.parse_args()


def _machine() -> str:
    """The CPU model and its int8-relevant flags, from /proc/cpuinfo where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} cores ({' '.join(wanted) or 'no avx2'})"


def _cores(folders: list[Path]) -> set[Path]:
    return {p for f in folders if f.is_dir() for p in f.iterdir() if p.name.startswith("core")}


def main() -> None:
    args = parse_args()
    command = [sys.executable, "-m", "project", "fit", f"--config={args.config}",
               f"--config={REPO / 'configs' / 'trainer' / 'ddp_cpu.yaml'}", f"--trainer.max_epochs={args.max_epochs}"]
    if Path(args.config).stem != "quickstart":
        command.append(f"--data.init_args.data_dir={args.data_dir}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            watched = [work] + ([Path(args.core_dir)] if args.core_dir else [])
            before = _cores(watched)
            start = time.perf_counter()
            done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
            seconds.append(time.perf_counter() - start)
            time.sleep(1)  # a rank that aborts as it exits writes its core a moment later
            new_cores = sorted(str(p) for p in _cores(watched) - before)
            aborted = done.returncode != 0 or "terminate called" in done.stderr or bool(new_cores)
            runs.append({"run": i, "status": done.returncode, "terminate": "terminate called" in done.stderr,
                         "cores": new_cores})
            print(f"run {i + 1}/{args.runs}: status {done.returncode}{', ABORT' if aborted else ''} "
                  f"({seconds[-1]:.1f} s)", flush=True)
            if aborted:
                print(done.stderr[-2000:], flush=True)
    aborts = [r for r in runs if r["status"] != 0 or r["terminate"] or r["cores"]]
    print(json.dumps({
        "machine": _machine(),
        "config": Path(args.config).name,
        "runs": args.runs,
        "aborts": len(aborts),
        "aborted_runs": aborts,
        "median_s": sorted(seconds)[len(seconds) // 2] if seconds else None,
    }))


if __name__ == "__main__":
    main()
