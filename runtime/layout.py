"""The on-disk contract of a workspace, in one place (torch-free: the learner, the exporter and the
runtime all use it).

    WS/workspace.json              data source, configuration, workspace id
    WS/.lock                       advisory write lock (fcntl.flock), held by learn / eval / export
    WS/state/task_NNN.safetensors  learner state after task NNN ...
    WS/state/task_NNN.json         ... and its description; written last: the task's commit record
    WS/packs/vNNNN/                one pack per published task
    WS/current                     name of the pack to serve ("vNNNN", a folder directly in WS/packs)
    WS/report.json                 accuracy matrix, summary metrics, per-task timings
    WS/follow.json                 a follower's leader, workspace id and downgrade floor (serve --follow)
    WS/downloads/                  a follower's pack archives while they arrive (never a pack folder)

Every file is written to a temporary name in its own folder, flushed and fsynced, renamed over
the target, and the folder is fsynced: a reader (or a device that loses power) sees the old file
or the new one, never a part of one. A write the disk refuses (full, read-only, quota, file too
large) removes its temporary file and raises ``StorageError`` with one line.
"""
from __future__ import annotations

import errno
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from mmcl_edge.errors import PackRejected, StorageError, WorkspaceError, WorkspaceLocked

WORKSPACE_FILE = "workspace.json"
LOCK_FILE = ".lock"
STATE_DIR = "state"
PACKS_DIR = "packs"
CURRENT_FILE = "current"
REPORT_FILE = "report.json"
HELDOUT_DIR = "heldout"
INBOX_DIR = "inbox"
FOLLOW_FILE = "follow.json"
DOWNLOADS_DIR = "downloads"
PACK_NAME = re.compile(r"^v(\d{4,9})$")
TMP_PREFIX = ".tmp-"

# errno values that mean "the storage refused", not "the program is wrong"
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO}


def storage_error(exc: OSError, path: Path | str) -> StorageError:
    return StorageError(f"cannot write {path}: {os.strerror(exc.errno) if exc.errno else exc} "
                        "(nothing was left half-written; free space or fix permissions and run the command again)")


# errno values only a write can cause: the rest (EACCES, EPERM, EIO) may come from a read
WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def os_error_message(exc: OSError) -> str:
    """One line for an ``OSError`` the storage raised, with the right verb: "cannot read" when the
    path (or the nearest folder above it that exists) cannot be read, else "cannot write"."""
    path = exc.filename or ""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno not in WRITE_ONLY_ERRNOS and path and _unreadable(path):
        verb = "read"
    elif exc.errno == errno.EIO:
        verb = "read or write"
    else:
        verb = "write"
    return f"cannot {verb} {path or '(a file)'}: {reason}"


def _unreadable(path) -> bool:
    p = os.path.abspath(path)
    while not os.path.lexists(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    return not os.access(p, os.R_OK | (os.X_OK if os.path.isdir(p) else 0),
                         effective_ids=os.access in os.supports_effective_ids)


def resolve_root(path) -> Path:
    """A workspace path made absolute; a symbolic link loop is a ``WorkspaceError``, not a traceback."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # Python < 3.13: RuntimeError("Symlink loop ..."); later ELOOP
        raise WorkspaceError(f"{path} cannot be used as a workspace: {exc}") from None


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """``writer(tmp)`` writes the content to a temporary path; it is fsynced and renamed to ``path``."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, path) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False))


def read_json(path: Path, what: str = "file"):
    """JSON from ``path``; a corrupt or empty file is a ``WorkspaceError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WorkspaceError(f"{path} ({what}) is corrupt or empty ({exc}); restore it or remove it "
                             "and run the command again") from None


def clean_temporaries(root: Path) -> list[Path]:
    """Remove the temporary files and partial pack folders an interrupted writer left behind."""
    root = Path(root)
    removed = []
    for folder in (root, root / STATE_DIR, root / PACKS_DIR, root / "backbones", root / HELDOUT_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(TMP_PREFIX) or p.name.endswith(".partial") or ".tmp" in p.name:
                if p.is_dir() and not p.is_symlink():
                    import shutil

                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# state ------------------------------------------------------------------------------------------
def state_paths(root: Path, k: int) -> tuple[Path, Path]:
    d = Path(root) / STATE_DIR
    return d / f"task_{k:03d}.safetensors", d / f"task_{k:03d}.json"


def heldout_path(root: Path, k: int) -> Path:
    """Task ``k``'s held-out data as taps with their class names (written before its state commits)."""
    return Path(root) / HELDOUT_DIR / f"task_{k:03d}.npz"


def committed_tasks(root: Path) -> int:
    """Tasks 0..n-1 whose state is committed (weights and their description both present)."""
    k = 0
    while all(p.is_file() for p in state_paths(root, k)):
        k += 1
    return k


# packs and the current pointer ------------------------------------------------------------------
def pack_name(version: int) -> str:
    return f"v{version:04d}"


def pack_versions(root: Path) -> list[int]:
    folder = Path(root) / PACKS_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := PACK_NAME.match(p.name)) and p.is_dir())


def next_version(root: Path) -> int:
    return max(pack_versions(root), default=-1) + 1


def check_pack_name(name: str) -> str:
    """A pack name as ``current`` may hold it: ``vNNNN``, nothing else (no path, no ``..``)."""
    name = name.strip()
    if not PACK_NAME.match(name):
        raise PackRejected(f"'current' must name a pack folder such as v0003 directly inside packs/, "
                           f"not {name[:80]!r}")
    return name


def read_current(root: Path) -> str | None:
    """The pack name in ``WS/current`` (validated), or None when there is none yet."""
    path = Path(root) / CURRENT_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PackRejected(f"{path} cannot be read ({exc})") from None
    if not text.strip():
        return None
    return check_pack_name(text)


def current_folder(root: Path) -> Path | None:
    name = read_current(root)
    if name is None:
        return None
    folder = Path(root) / PACKS_DIR / name
    if folder.is_symlink() or not folder.is_dir():
        raise PackRejected(f"'current' names {name}, which is not a folder directly inside {Path(root) / PACKS_DIR}")
    return folder


def set_current(root: Path, name: str) -> None:
    """Point ``WS/current`` at pack ``name`` atomically."""
    atomic_write_text(Path(root) / CURRENT_FILE, check_pack_name(name) + "\n")


_held: dict[Path, int] = {}


# the write lock ---------------------------------------------------------------------------------
@contextmanager
def workspace_lock(root: Path, what: str = "write"):
    """Hold ``WS/.lock`` exclusively (fcntl.flock, advisory); a second writer fails at once.

    The kernel drops the lock when its holder dies (even by SIGKILL): no stale lock files.
    """
    import fcntl

    root = Path(root).resolve()
    if _held.get(root):  # re-entrant within one process (learn holds it while publish runs)
        _held[root] += 1
        try:
            yield
        finally:
            _held[root] -= 1
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, root / LOCK_FILE) from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise WorkspaceLocked(f"workspace {root} is in use by {holder}; wait for it to finish "
                                  f"(only one learn/eval/export may write to a workspace at a time)") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"mmcl-edge {what} (pid {os.getpid()})".encode(), 0)
        except OSError:
            pass
        _held[root] = 1
        try:
            yield
        finally:
            _held.pop(root, None)
    finally:
        os.close(fd)  # closing releases the flock
