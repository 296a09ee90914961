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

    def header(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """The member's declared shape and dtype, from its ``.npy`` header alone."""
        try:
            with self.zip.open(f"{name}.npy") as f:
                version = npformat.read_magic(f)
                read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
                shape, _, dtype = read(f)
        except KeyError:
            raise self.error(f"{self.path} has no array {name!r}") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise self.error(f"{self.path}: the header of {name!r} cannot be read ({exc})") from None
        return shape, dtype

    def read(self, name: str) -> np.ndarray:
        """One member, after its header passed the checks: plain numbers, at most ``max_bytes``."""
        shape, dtype = self.header(name)
        if dtype.hasobject:
            raise self.error(f"{self.path}: {name!r} holds Python objects (a pickle); only plain numeric arrays "
                             "are read (save it with a numeric dtype)")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.max_bytes:
            raise self.error(f"{self.path}: {name!r} declares shape {shape} of {dtype} ({nbytes / 2**30:.1f} GiB), "
                             f"more than the {self.max_bytes / 2**30:.1f} GiB one array may take")
        try:
            with self.zip.open(f"{name}.npy") as f:
                return npformat.read_array(f, allow_pickle=False)
        except (OSError, ValueError, EOFError, MemoryError, zipfile.BadZipFile, zlib.error) as exc:
            raise self.error(f"{self.path}: {name!r} cannot be read ({str(exc)[:200]})") from None
