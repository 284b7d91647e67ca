"""Reading and writing IDX files (MNIST's format), plain or gzipped, with every header field checked."""

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from project.errors import UserError

# IDX type code -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a valid IDX file ({why}): delete it and download it again")


def read_idx(path: str | Path) -> Tensor:
    """The array stored in an IDX file (``.gz`` or plain) as a tensor (uint8 for MNIST)."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise _corrupt(path, f"broken gzip stream: {err}") from None
    if len(raw) < 4:
        raise _corrupt(path, f"only {len(raw)} bytes")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise _corrupt(path, "bad magic number")
    if code not in IDX_DTYPES:
        raise _corrupt(path, f"unknown type code 0x{code:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise _corrupt(path, f"header of {ndim} dimensions is cut short")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = IDX_DTYPES[code]
    expected = 4 + 4 * ndim + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise _corrupt(path, f"{len(raw)} bytes where the header {list(shape)} needs {expected}, truncated?")
    array = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | Path, array: np.ndarray | Tensor) -> Path:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    code = codes[array.dtype.newbyteorder("=")]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(IDX_DTYPES[code]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same array always gives the same bytes.
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
    return path
