"""Argument checks the subcommands share: each bad argument is one UserError line."""

from collections.abc import Sequence
from pathlib import Path

from project.errors import UserError

PASSED_ON = ("--data.", "--model.", "--trainer.", "--seed")  # given to the config, as to `python -m project fit`


def check_passed_on(extra: Sequence[str], command: str) -> None:
    """Arguments the subcommand does not know must be ones it passes on to the config."""
    bad = [a for a in extra if a.startswith("-") and not a.startswith(PASSED_ON)]
    if bad:
        raise UserError(f"unknown argument {bad[0]}: see python -m project {command} --help")


def choose(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of ``allowed``, in the order given, each once."""
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        raise UserError(f"unknown {what} {unknown[0] if unknown else '(none)'}: choose from {','.join(allowed)}")
    return list(dict.fromkeys(chosen))


def timing(batch_sizes: str, warmup: int, repeats: int, allow_none: bool = False) -> list[int]:
    """The latency batch sizes (none at all only when ``allow_none``), checked with the warm-up and repeat counts."""
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    if (not sizes and not allow_none) or any(b < 1 for b in sizes):
        raise UserError(f"--batch-sizes must be positive integers, got {batch_sizes!r}")
    if warmup < 0 or repeats < 1:
        raise UserError(f"--warmup must be >= 0 and --repeats >= 1, got {warmup} and {repeats}")
    return sizes


def check_config(config: str) -> None:
    if not Path(config).is_file():
        raise UserError(f"config {config} does not exist: pass the config the checkpoint was trained with")
