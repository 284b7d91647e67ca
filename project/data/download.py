"""Downloading with torchvision's own code, turning every failure into a reason string."""

from collections.abc import Callable
from pathlib import Path

from project.errors import UserError


def try_download(download: Callable[[], object]) -> str | None:
    """Run ``download``; return None on success, or a one-line reason why it failed."""
    try:
        download()
    except Exception as err:  # network, DNS, HTTP, checksum, disk: all end in the same user message
        first_line = (str(err).strip().splitlines() or [""])[0]
        return f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    return None


def missing_data_error(name: str, folder: Path, reason: str, what: str) -> UserError:
    """The one-line error for a dataset that is neither on disk nor downloadable."""
    return UserError(
        f"{name} not found in {folder.resolve()} and it could not be downloaded ({reason}):"
        f" connect to the internet, or put {what} there, or pass --data.data_dir DIR"
    )
