"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""

import sys
from collections.abc import Callable
from typing import Any


class UserError(ValueError):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The message must say what is wrong and what to do about it, in one line.
    """


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The UserError behind ``exc``: jsonargparse wraps errors raised while it instantiates classes."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def exit_on_user_error(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)``; a UserError behind any exception ends the process with one ``error:`` line, exit 2."""
    try:
        return fn(*args)
    except Exception as exc:
        err = find_user_error(exc)
        if err is None:
            raise
        # a UserError raised in a DataLoader worker arrives wrapped, with the worker's traceback before it
        message = str(err).strip().splitlines()[-1].removeprefix("project.errors.UserError: ")
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
