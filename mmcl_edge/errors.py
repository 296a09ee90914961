"""One hierarchy for every error a user can cause and fix (torch-free: the runtime imports it).

The CLI turns any ``MMCLError`` into one ``error:`` line and exit code 2; every other exception
is a bug and keeps its traceback.

    MMCLError
    ├── DataFormatError      the user's data (also a ValueError)
    ├── ConfigError          a configuration key or value (also a ValueError)
    ├── WorkspaceError       a workspace cannot be used as asked (also a RuntimeError)
    │   ├── WorkspaceLocked  another process writes to the workspace
    │   └── StorageError     the disk refused a write (full, read-only, quota, file too large)
    └── RuntimeUserError     the runtime (also a RuntimeError)
        ├── PackRejected     a pack failed validation or authentication
        └── InputError       an input given to predict (also a ValueError)
"""
from __future__ import annotations


class MMCLError(Exception):
    """Something the user can fix; the message says what and how, in plain words."""


class DataFormatError(MMCLError, ValueError):
    """A user's data cannot be used; the message says what is wrong in plain words."""


class ConfigError(MMCLError, ValueError):
    """A configuration key is unknown or its value is not allowed."""


class WorkspaceError(MMCLError, RuntimeError):
    """A workspace cannot be used as asked; the message says why and what to do."""


class WorkspaceLocked(WorkspaceError):
    """Another process holds the workspace's write lock."""


class StorageError(WorkspaceError):
    """A write failed (disk full, read-only file system, quota); nothing was left half-written."""


class RuntimeUserError(MMCLError, RuntimeError):
    """Something about the workspace, a pack or an input that the user can fix."""


class PackRejected(RuntimeUserError):
    """A pack failed validation; the pack that was serving keeps serving."""


class InputError(RuntimeUserError, ValueError):
    """An input given to ``predict`` does not fit the loaded modalities or the runtime's limits."""


__all__ = ["MMCLError", "DataFormatError", "ConfigError", "WorkspaceError", "WorkspaceLocked", "StorageError",
           "RuntimeUserError", "PackRejected", "InputError"]
