"""A restricted unpickler for CIFAR batch files: numpy arrays and plain containers, nothing callable else.

A pickle can name any importable callable and have it called while loading (``os.system`` ...).
The CIFAR batches only need numpy's array reconstruction, so every other global is refused
before it is even imported.
"""

import io
import pickle
from pathlib import Path
from typing import Any

from project.errors import UserError

# (module, name) pairs the CIFAR python batches reference (numpy 1 and numpy 2 spellings), plus
# _codecs.encode, which Python 3 uses for bytes in protocol-2 pickles (str -> bytes, nothing else).
ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def load_cifar_batch(path: Path) -> dict[bytes, Any]:
    """The dict stored in one CIFAR batch file, loaded without running any code from it."""
    try:
        data = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except RefusedGlobal as err:
        raise UserError(
            f"{path} asks to load {err} while unpickling, which a CIFAR batch never does; refused:"
            " delete the file and download CIFAR again from the official source"
        ) from None
    except Exception as err:  # truncated or garbage bytes raise many different types
        raise UserError(
            f"{path} is not a readable CIFAR batch ({type(err).__name__}: {err}): delete it and download it again"
        ) from None
    if not isinstance(data, dict):
        raise UserError(
            f"{path} holds a {type(data).__name__}, not a CIFAR batch dict: delete it and download it again"
        )
    return data
