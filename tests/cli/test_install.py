"""The package as a user installs it without ``-e``: a wheel in a fresh virtual environment, run from an
empty folder, so nothing can be read from the checkout (configs, package data, the source tree)."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TOP_LEVEL_IGNORED = {".git", ".venv", "lightning_logs", "build", "dist", "data", ".scratch"}  # data/: downloads, not project/data


def _ignore(folder: str, names: list[str]) -> set[str]:
    """What the copy of the checkout leaves out: run outputs and downloads at its top, caches anywhere."""
    top = {n for n in names if n in TOP_LEVEL_IGNORED} if Path(folder) == REPO else set()
    return top | {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}


def _run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def running_site_dirs() -> list[str]:
    """The site-packages folders of the interpreter running the tests: a venv's, a conda env's or the system's.

    ``venv --system-site-packages`` would see the *base* interpreter's site-packages, which inside a venv are
    not where the dependencies were installed.
    """
    dirs = [*site.getsitepackages(), site.getusersitepackages() if site.ENABLE_USER_SITE else ""]
    return [d for d in dict.fromkeys(dirs) if d and Path(d).is_dir()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv holding the project's wheel. Its dependencies come from the running
    interpreter's site-packages, listed in a ``.pth`` file as plain folders: their own ``.pth`` files (the
    editable install of the checkout among them) are not processed, so ``project`` can only be the wheel."""
    root = tmp_path_factory.mktemp("install")
    shutil.copytree(REPO, root / "src", ignore=_ignore)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "wheels"),
          str(root / "src")], cwd=root)
    _run([sys.executable, "-m", "venv", str(root / "venv")], cwd=root)
    python = root / "venv" / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    (Path(purelib) / "running_interpreter_site.pth").write_text("\n".join(running_site_dirs()) + "\n")
    (wheel,) = (root / "wheels").glob("*.whl")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=root)
    return python


def test_installed_package_is_the_wheel_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    out = _run([str(installed), "-c", "import project; print(project.__file__)"], cwd=tmp_path).stdout.strip()
    assert out.startswith(str(installed.parents[1])), out


def test_compress_help_and_a_compress_run_from_an_empty_folder(installed: Path, tmp_path: Path) -> None:
    help_text = _run([str(installed), "-m", "project", "compress", "--help"], cwd=tmp_path).stdout
    assert "--variant-dir" in help_text and "compress_variants" in help_text
    config = tmp_path / "quickstart.yaml"  # a user's copy of a config; its data ships inside the package
    config.write_text((REPO / "configs" / "quickstart.yaml").read_text())
    quick = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    _run([str(installed), "-m", "project", "fit", f"--config={config}", "--trainer.max_epochs=1", "--test_after_fit=false",
          *quick], cwd=tmp_path)
    (ckpt,) = tmp_path.glob("lightning_logs/quickstart/version_0/checkpoints/last.ckpt")
    _run([str(installed), "-m", "project", "compress", f"--config={config}", f"--ckpt={ckpt}", "--variants=fp32,unstructured",
          "--finetune-epochs=1", "--runtimes=torch", "--warmup=0", "--repeats=1", "--batch-sizes=1", *quick], cwd=tmp_path)
    report = tmp_path / "lightning_logs" / "compress" / "version_0"
    assert (report / "report.md").is_file()
    assert sorted(p.name for p in (report / "artifacts").iterdir()) == ["fp32.pt2", "unstructured.pt2"]
