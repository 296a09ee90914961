"""Reading and writing bags with ``rosbags`` (no ROS installation): rosbag2 folders (sqlite3 or
MCAP), a bare ``.mcap`` file, ROS 1 ``.bag`` files. Every failure of the bag itself becomes a
DataFormatError naming the bag."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sqlite3
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from mmcl_edge.errors import DataFormatError, MMCLError


def _rosbags():
    if importlib.util.find_spec("rosbags") is None:
        raise DataFormatError("reading bags needs the ros extra: pip install 'mmcl-edge[ros]'")


def _bag_errors() -> tuple[type[BaseException], ...]:
    """What rosbags and the storage below it raise for a broken or foreign file."""
    from rosbags.highlevel import AnyReaderError
    from rosbags.rosbag1 import ReaderError as Reader1Error
    from rosbags.rosbag2 import ReaderError as Reader2Error
    from rosbags.serde import SerdeError
    from rosbags.typesys import TypesysError

    return (AnyReaderError, Reader1Error, Reader2Error, SerdeError, TypesysError, sqlite3.Error, struct.error,
            zlib.error, EOFError, KeyError, IndexError, ValueError, AssertionError, OSError)


class Bag:
    """An open bag: topics, types, counts, time range, and its messages in receive-time order."""

    def __init__(self, path):
        _rosbags()
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DataFormatError(f"bag {self.path} does not exist")
        self._errors = _bag_errors()
        try:
            self.reader = AnyReader([self.path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
            self.reader.open()
        except MMCLError:
            raise
        except self._errors as exc:
            raise DataFormatError(f"cannot read the bag {self.path}: {_why(exc)}") from None
        self.start_ns = self.reader.start_time
        self.end_ns = self.reader.end_time
        self.topics = {name: (info.msgtype, info.msgcount) for name, info in self.reader.topics.items()}

    @property
    def duration(self) -> float:
        """Seconds from the first message to the last."""
        return max(self.end_ns - self.start_ns, 0) / 1e9

    @property
    def storage(self) -> str:
        if self.path.suffix == ".bag":
            return "rosbag1"
        if self.path.suffix == ".mcap":
            return "mcap"
        return "rosbag2 " + ("mcap" if any(self.path.glob("*.mcap")) else "sqlite3")

    def series_steps(self, sources: dict, seconds: float) -> dict[str, int]:
        """Steps per timeseries window of ``seconds``: TOPICS.json's ``"steps"``, else
        round(seconds x the topic's mean rate over the recording)."""
        return {m: s.steps or max(2, int(round(seconds * self.topics[s.topic][1] / max(self.duration, 1e-9))))
                for m, s in sources.items() if s.kind == "timeseries"}

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "Bag":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_topics(self, topics: list[str]) -> None:
        """Every topic must be in the bag: a missing one is named with what the bag has."""
        missing = [t for t in topics if t not in self.topics]
        if missing:
            raise DataFormatError(f"topic {missing[0]} is not in the bag {self.path} (it has: "
                                  f"{', '.join(sorted(self.topics)) or 'no topics'})")

    def raw(self, topics: list[str] | None = None) -> Iterator[tuple[object, int, bytes]]:
        """``(connection, receive ns, raw bytes)`` in receive-time order, for ``topics`` (all when None)."""
        conns = [c for c in self.reader.connections if topics is None or c.topic in topics]
        if topics is not None and not conns:
            return
        try:
            yield from self.reader.messages(connections=conns)
        except MMCLError:
            raise
        except self._errors as exc:
            raise DataFormatError(f"cannot read the bag {self.path}: {_why(exc)}") from None

    def messages(self, topics: list[str]) -> Iterator[tuple[str, int, object]]:
        """``(topic, receive ns, message)`` deserialised, for ``topics``, in receive-time order."""
        for conn, ns, data in self.raw(topics):
            try:
                msg = self.reader.deserialize(data, conn.msgtype)
            except self._errors as exc:
                raise DataFormatError(f"cannot read a {conn.msgtype} message on {conn.topic} in the bag "
                                      f"{self.path}: {_why(exc)}") from None
            yield conn.topic, ns, msg

    def inspect(self) -> dict:
        """Topics, types, counts, rates and the time range: what TOPICS.json needs. The rate is one over
        the median spacing of receive times (gaps and pauses do not lower it)."""
        times: dict[str, list[int]] = {}
        for conn, ns, _ in self.raw():
            times.setdefault(conn.topic, []).append(ns)
        rows = []
        for name, (msgtype, count) in sorted(self.topics.items()):
            t = np.asarray(times.get(name, []), np.int64)
            d = np.diff(t)
            d = d[d > 0]
            rows.append({"topic": name, "type": msgtype, "count": count,
                         "rate_hz": round(1e9 / float(np.median(d)), 3) if len(d) else None,
                         "start": round((t[0] - self.start_ns) / 1e9, 6) if len(t) else None,
                         "end": round((t[-1] - self.start_ns) / 1e9, 6) if len(t) else None})
        return {"bag": str(self.path), "storage": self.storage, "start_ns": self.start_ns, "end_ns": self.end_ns,
                "duration": round(self.duration, 6), "messages": sum(c for _, c in self.topics.values()),
                "topics": rows}


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def bag_files(path) -> list[Path]:
    """The files that make up a bag: the file itself, or every file in a rosbag2 folder."""
    path = Path(path)
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def bag_sha256(path) -> dict[str, str]:
    """sha256 of each file of the bag (names relative to a folder bag): where a task's data came from."""
    path = Path(path)
    out = {}
    for f in bag_files(path):
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[f.name if f == path else str(f.relative_to(path))] = h.hexdigest()
    return out


@contextmanager
def new_bag(path, storage: str = "mcap"):
    """A rosbags rosbag2 Writer for a new bag folder at ``path``; written beside it under a
    temporary name and renamed into place when complete, so a failure leaves nothing at ``path``."""
    _rosbags()
    from rosbags.rosbag2 import StoragePlugin, Writer

    path = Path(path).expanduser()
    if path.exists():
        raise DataFormatError(f"{path} exists already: give a new name for the output bag")
    if not path.parent.is_dir():
        raise DataFormatError(f"the folder {path.parent} for the output bag does not exist")
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        writer = Writer(tmp / path.name, version=9, storage_plugin=plugin)
        writer.open()
        try:
            yield writer
        finally:
            writer.close()
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
