"""One pack as one archive: the form a pack takes on the network (``GET .../packs/{version}``).

    data = pack_archive(WS / "packs" / "v0003")       # bytes: an uncompressed POSIX tar
    extract_archive(path_or_bytes, tmp_folder)         # the files back, each fsynced; nothing else

The archive holds the pack folder's regular files (``manifest.json``, ``signature.json`` when the
pack is signed, the files the manifest lists) under their bare names, sorted, with fixed owner, mode
and time: the same pack gives the same bytes on every host and after every restart, so its sha256
names it and an interrupted download can resume (``Range``) against it. Extraction trusts nothing:
only regular files with plain names, no duplicates, bounded in count and size. It does not verify
the pack: the extracted folder goes through ``Runtime.swap`` like any local pack.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from mmcl_edge.runtime.errors import PackRejected
from mmcl_edge.runtime.layout import fsync_dir

MEDIA_TYPE = "application/x-tar"
MAX_MEMBERS = 16                      # a pack is a manifest, a signature and a few listed files
MAX_ARCHIVE_BYTES = (512 + 8) << 20   # the pack's weight limit (pack.MAX_WEIGHTS_BYTES) plus headroom


def _plain(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and len(name) <= 100


def pack_archive(folder: Path) -> bytes:
    """The archive of the pack in ``folder``: its regular files, deterministic bytes."""
    folder = Path(folder)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.is_file(follow_symlinks=False) or not _plain(entry.name):
                continue  # what a pack may not hold is never sent: the receiver would refuse it anyway
            data = Path(entry.path).read_bytes()
            info = tarfile.TarInfo(entry.name)
            info.size, info.mode, info.mtime, info.type = len(data), 0o644, 0, tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract_archive(source, dest: Path) -> list[str]:
    """Write the archive's files (``source``: a path or bytes) into the new folder ``dest``, each
    fsynced, then the folder; returns their names. Anything but plain regular files is refused."""
    dest = Path(dest)
    try:
        tar = tarfile.open(source, mode="r:") if isinstance(source, (str, Path)) else \
            tarfile.open(fileobj=io.BytesIO(source), mode="r:")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackRejected(f"the pack archive cannot be read ({exc})") from None
    names: list[str] = []
    total = 0
    with tar:
        dest.mkdir(parents=True)
        try:
            for info in tar:
                if not info.isreg() or not _plain(info.name) or info.name in names:
                    raise PackRejected(f"the pack archive holds {info.name[:80]!r}, which is not a plain, "
                                       "unique file name of a regular file")
                total += info.size
                if len(names) >= MAX_MEMBERS or total > MAX_ARCHIVE_BYTES:
                    raise PackRejected(f"the pack archive holds more than {MAX_MEMBERS} files or "
                                       f"{MAX_ARCHIVE_BYTES >> 20} MiB")
                src = tar.extractfile(info)
                fd = os.open(dest / info.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as f:
                    while block := src.read(1 << 20):
                        f.write(block)
                    f.flush()
                    os.fsync(f.fileno())
                names.append(info.name)
        except (tarfile.TarError, EOFError) as exc:
            raise PackRejected(f"the pack archive is truncated or corrupt ({exc})") from None
    fsync_dir(dest)
    return names
