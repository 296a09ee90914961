"""Reading ``.npz`` files without letting the file decide the memory (numpy + the standard library).

The one reader of user ``.npz`` files: the generic data format (``mmcl_edge.data.generic``) and
``mmcl-edge predict -i file.npz`` both use it. ``np.load`` would inflate whatever member is asked
for, whatever its header claims; here only the members asked for are read, each member's ``.npy``
header is read first (without inflating its data) and its declared size checked against
``max_bytes`` before anything is allocated, and object (pickled) arrays are refused.
"""
from __future__ import annotations

import math
import os
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npformat

from mmcl_edge.errors import DataFormatError, MMCLError


def default_max_bytes() -> int:
    """Half the machine's memory: no single array of a sane input needs more."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class NpzReader:
    """``with NpzReader(path) as z: z.names, z.read("x_audio")``; every failure is ``error`` (one line)."""

    def __init__(self, path, error: type[MMCLError] = DataFormatError, max_bytes: int | None = None):
        self.path, self.error = path, error
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile, ValueError) as exc:
            raise error(f"{path} is not a readable .npz file ({exc})") from None
        self.names = [n[:-4] for n in self.zip.namelist() if n.endswith(".npy")]

    def __enter__(self) -> "NpzReader":
        return self

    def __exit__(self, *exc) -> None:
        self.zip.close()

    def read(self, name: str) -> np.ndarray:
        """One member, after its header passed the checks: plain numbers, at most ``max_bytes``."""
        try:
            with self.zip.open(f"{name}.npy") as f:
                return _read_checked(f, f"{self.path}: {name!r}", self.error, self.max_bytes)
        except KeyError:
            raise self.error(f"{self.path} has no array {name!r}") from None
        except (OSError, zipfile.BadZipFile, zlib.error) as exc:
            raise self.error(f"{self.path}: {name!r} cannot be read ({str(exc)[:200]})") from None


def read_npy(path, error: type[MMCLError] = DataFormatError, max_bytes: int | None = None) -> np.ndarray:
    """A ``.npy`` file, with the same checks as an ``.npz`` member."""
    try:
        with open(path, "rb") as f:
            return _read_checked(f, str(path), error, default_max_bytes() if max_bytes is None else max_bytes)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_checked(f, what: str, error: type[MMCLError], max_bytes: int) -> np.ndarray:
    """Header first (declared shape and dtype, nothing inflated), then the data if it passes."""
    try:
        version = npformat.read_magic(f)
        read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except (ValueError, EOFError) as exc:
        raise error(f"{what} is not a .npy array ({str(exc)[:200]})") from None
    if dtype.hasobject:
        raise error(f"{what} holds Python objects (a pickle); only plain numeric arrays are read "
                    "(save it with a numeric dtype)")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise error(f"{what} declares shape {shape} of {dtype} ({nbytes / 2**30:.1f} GiB), more than the "
                    f"{max_bytes / 2**30:.1f} GiB one array may take")
    buf = bytearray(nbytes)  # read in place: the array owns this buffer, nothing is copied
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise error(f"{what} holds {got} bytes of data where its header declares {nbytes}")
        got += n
    a = np.frombuffer(buf, dtype=dtype).reshape(shape[::-1] if fortran else shape)
    return a.T if fortran else a
