"""The CLI's argument parser: bad arguments as one line, with a "did you mean" where one can be found."""

import difflib
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

_BOILERPLATE = ("Does not validate", "Subtypes", "Errors", "- Problem with given class_path", "Given value")


def summarize_parser_error(message: str) -> str:
    """jsonargparse's nested multi-line message as one line: the full key and the innermost reason."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    keys, detail = [], lines[0]
    for i, line in enumerate(lines):
        match = re.match(r'(?:- )?(?:Problem with given class_path .*?:\s*)?Parser key "([^"]+)":?\s*(.*)', line)
        if match:
            keys.append(match.group(1))
            rest = match.group(2) or next((n for n in lines[i + 1 :] if not n.startswith(_BOILERPLATE)), "")
            detail = rest.removeprefix("- ")
    if keys:
        detail = f"{'.'.join(dict.fromkeys(keys))}: {detail}"
    return f"{detail} (run with --help to see the options)"


# arguments of torch's optimizers: given to the model, they belong to its optimizer
_OPTIMIZER_ARGS = {"lr", "weight_decay", "momentum", "nesterov", "betas", "eps", "dampening", "amsgrad"}


class ProjectParser(LightningArgumentParser):
    """Reports bad arguments as one line through UserError instead of a page of usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse is trying alternatives internally: let it
            super().error(message, ex)
        line = summarize_parser_error(message)
        sys.stderr.write(f"error: {line}{self._did_you_mean(message, line)}\n")
        raise SystemExit(2)

    def _did_you_mean(self, message: str, line: str) -> str:
        """For an unknown option: the closest one (a typo), else one with the same last name (misplaced)."""
        missing = re.search(r"File does not exist: '([^']+)'", line)
        if missing:
            path = Path(missing.group(1))
            folder = next((f for f in (path.parent, *path.parents) if f.is_dir()), Path("."))
            names = [str(q) for pattern in ("*.yaml", "*/*.yaml") for q in folder.glob(pattern)] if folder != Path("/") else []
            close = difflib.get_close_matches(str(path), names, n=1, cutoff=0.8)
            return f"; did you mean {close[0]}?" if close else ""
        misplaced = re.search(r"(\w+): Option '(\w+)' is not accepted", line)
        if misplaced and misplaced.group(2) in _OPTIMIZER_ARGS:
            return f"; did you mean --{misplaced.group(1)}.init_args.optimizer.init_args.{misplaced.group(2)}?"
        match = re.search(r"unrecognized arguments: (--[\w.\-]+)", message)
        if not match:
            return ""
        name = match.group(1).split("=")[0]
        options = [o for o in self._option_string_actions if o.startswith("--") and o != name]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.85)
        if not close:
            last = name.rsplit(".", 1)[-1]
            close = [o for o in options if o.rsplit(".", 1)[-1] == last][:1]
        return f"; did you mean {close[0]}?" if close else ""

    def save(self, cfg: Any, path: Any, *args: Any, skip_check: bool = True, **kwargs: Any) -> None:
        """jsonargparse's ``save``, without validating again a config that parsing has already validated.

        Lightning's SaveConfigCallback saves the run's config at the start of every fit; the second
        validation took 0.05-0.07 s of it on this project's machine and wrote the same file.
        """
        super().save(cfg, path, *args, skip_check=skip_check, **kwargs)
