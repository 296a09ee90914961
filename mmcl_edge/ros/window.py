"""SensorWindow: several topics aligned by stamp, cut into windows, one sample per window.

The one place where a message's time is chosen, where absence is decided and where each modality
is resampled to its fixed shape; the bag -> task conversion, the bag replay and a user's own ROS 2
node all cut their samples here, so a pack sees in the field what it was taught from.

Per window ``[start, end]`` (seconds from the origin) and modality:
- no message inside the window: the modality is left out of the sample (absent, not zeros);
- timeseries: ``steps`` values per channel at the centres of equal cells spanning the window,
  linearly interpolated from the messages around them (gaps and jitter land on the grid);
  ``steps`` = TOPICS.json's ``"steps"``, else what the caller fixes, else round(window length x
  the rate measured from the stamps) at the first window, then kept;
- video: ``frames`` frames (TOPICS.json, default 16), at the centres of equal cells, each the
  nearest message inside the window;
- image, vector, text: the message nearest the window's middle.
A message's time is its header stamp where it has one (unless ``"time": "receive"``), else the
receive time given to ``push``.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmcl_edge.errors import DataFormatError
from mmcl_edge.ros.messages import converter, header_stamp_ns, msgtype_of
from mmcl_edge.ros.topics import TopicSource, load_topics


@dataclass
class Window:
    start: float                                     # seconds from the origin
    end: float
    sample: dict[str, Any] = field(default_factory=dict)   # present modalities only
    key: Any = None                                  # what schedule() was given


class _Track:
    """One modality's buffered messages, kept sorted by time."""

    def __init__(self, source: TopicSource):
        self.source = source
        self.times: list[float] = []
        self.values: list[Any] = []
        self.converters: dict[str, Any] = {}
        self.spacings: deque[float] = deque(maxlen=512)   # recent stamp spacings, for the rate

    def add(self, t: float, value) -> None:
        if not self.times or t >= self.times[-1]:
            if self.times and t > self.times[-1]:
                self.spacings.append(t - self.times[-1])
            self.times.append(t)
            self.values.append(value)
        else:                                        # a late header stamp: keep the order
            i = bisect.bisect_right(self.times, t)
            self.times.insert(i, t)
            self.values.insert(i, value)

    def drop_before(self, t: float) -> None:
        """Forget messages older than ``t``, keeping the last one before it (interpolation needs it)."""
        i = bisect.bisect_left(self.times, t) - 1
        if i > 0:
            del self.times[:i], self.values[:i]

    def rate(self) -> float | None:
        """Messages per second, from the median of recent stamp spacings (robust to gaps and jitter)."""
        return float(1.0 / np.median(self.spacings)) if self.spacings else None


class SensorWindow:
    """Push ``(topic, stamp, message)``; get windows ``{modality: array}`` ready for ``Runtime.predict``.

    ``stamp`` is the receive time in integer nanoseconds (a bag's log time; in rclpy
    ``node.get_clock().now().nanoseconds``). Windows come back from ``push`` once the newest
    stamp is ``lateness`` seconds past their end (messages arriving later miss them):
    sliding windows when ``window`` and ``hop`` are given (empty ones are skipped), and any window
    asked for with ``schedule``. ``flush`` returns the rest at the end of a stream.
    Times are seconds from ``origin_ns`` (default: the first push's stamp).
    """

    def __init__(self, topics, *, window: float | None = None, hop: float | None = None,
                 steps: dict[str, int] | None = None, lateness: float = 0.25, origin_ns: int | None = None):
        self.sources = topics if isinstance(topics, dict) and all(isinstance(v, TopicSource) for v in topics.values()) \
            else load_topics(topics)
        if hop is not None and window is None:
            raise DataFormatError("a hop needs a window")
        if (window is not None and not window > 0) or (hop is not None and not hop > 0):
            raise DataFormatError(f"window and hop must be positive seconds, not {window!r} and {hop!r}")
        self.window, self.hop, self.lateness = window, hop, float(lateness)
        self.steps = dict(steps or {})
        self.origin_ns = origin_ns
        self.tracks = {m: _Track(s) for m, s in self.sources.items()}
        self.by_topic: dict[str, list[_Track]] = {}
        for tr in self.tracks.values():
            self.by_topic.setdefault(tr.source.topic, []).append(tr)
        self.watermark = -np.inf
        self._next = 0                                # index of the next sliding window
        self._scheduled: list[tuple[float, float, int, Any]] = []   # (end, start, order, key), sorted
        self._order = 0
        self._pushes = 0

    # -- input ---------------------------------------------------------------------------------
    def push(self, topic: str, stamp: int, message) -> list[Window]:
        """Add one message; return the windows it completed (in order of their end)."""
        tracks = self.by_topic.get(topic)
        if tracks is None:
            return []
        if isinstance(stamp, float):
            raise TypeError("stamp is the receive time in integer nanoseconds")
        if self.origin_ns is None:
            self.origin_ns = int(stamp)
        msgtype = msgtype_of(message)
        for tr in tracks:
            convert = tr.converters.get(msgtype)
            if convert is None:
                convert = tr.converters[msgtype] = converter(tr.source, msgtype)
            ns = header_stamp_ns(message) if tr.source.time == "header" else None
            t = ((ns if ns is not None else int(stamp)) - self.origin_ns) / 1e9
            tr.add(t, convert(message))
            self.watermark = max(self.watermark, t)
        return self._ready(final=False)

    def schedule(self, start: float, end: float, key=None) -> None:
        """Ask for the window ``[start, end]`` (seconds from the origin); it comes back from push or flush."""
        if not end > start:
            raise DataFormatError(f"a window must end after it starts: {start}..{end}")
        bisect.insort(self._scheduled, (float(end), float(start), self._order, key))
        self._order += 1

    def flush(self) -> list[Window]:
        """The end of the stream: every window still pending (sliding ones up to the last stamp)."""
        return self._ready(final=True)

    # -- output --------------------------------------------------------------------------------
    def sample(self, start: float, end: float) -> dict[str, Any]:
        """``{modality: value}`` for the window ``[start, end]``; modalities without a message in it are left out."""
        out = {}
        for m, tr in self.tracks.items():
            v = self._cut(m, tr, start, end)
            if v is not None:
                out[m] = v
        return out

    def rates(self) -> dict[str, float | None]:
        """Messages per second per modality, measured from recent stamps."""
        return {m: tr.rate() for m, tr in self.tracks.items()}

    # -- internals -----------------------------------------------------------------------------
    def _ready(self, final: bool) -> list[Window]:
        done: list[Window] = []
        limit = self.watermark + 1e-9 if final else self.watermark - self.lateness
        if self.window is not None and self.hop is not None:
            while True:
                start = self._next * self.hop
                if start + self.window > limit:
                    break
                self._next += 1
                w = Window(start, start + self.window, self.sample(start, start + self.window))
                if w.sample:
                    done.append(w)
        while self._scheduled and (final or self._scheduled[0][0] <= limit):
            end, start, _, key = self._scheduled.pop(0)
            done.append(Window(start, end, self.sample(start, end), key))
        done.sort(key=lambda w: w.end)
        self._pushes += 1
        if done or final or self._pushes % 256 == 0:    # the horizon moves when windows go out
            self._prune()
        return done

    def _prune(self) -> None:
        keep = []
        if self.window is not None and self.hop is not None:
            keep.append(self._next * self.hop)
        elif self.window is not None:
            keep.append(self.watermark - self.window - self.lateness)
        keep += [s for _, s, _, _ in self._scheduled]
        if self.window is None and not self._scheduled:
            return                                    # sample() on demand: the caller owns the horizon
        horizon = min(keep) if keep else self.watermark
        for tr in self.tracks.values():
            tr.drop_before(horizon)

    def _steps(self, m: str, tr: _Track, span: float) -> int:
        """Fixed per modality: given, from TOPICS.json, else measured at the first window and kept
        (every sample of a modality gets one shape)."""
        steps = self.steps.get(m) or tr.source.steps
        if not steps:
            rate = tr.rate()
            steps = self.steps[m] = max(2, int(round(span * rate))) if rate else 2
        return int(steps)

    def _cut(self, m: str, tr: _Track, start: float, end: float):
        times = tr.times
        i0, i1 = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
        if i1 <= i0:
            return None
        kind = tr.source.kind
        if kind == "timeseries":
            lo, hi = max(i0 - 1, 0), min(i1 + 1, len(times))
            try:
                values = np.stack([np.asarray(v, np.float32).reshape(-1) for v in tr.values[lo:hi]])
            except ValueError:
                raise DataFormatError(f"topic {tr.source.topic}: messages carry different numbers of values "
                                      f"between {start:.3f} and {end:.3f} s") from None
            steps = self._steps(m, tr, end - start)
            grid = start + (np.arange(steps) + 0.5) * ((end - start) / steps)
            t = np.asarray(times[lo:hi])
            out = np.empty((steps, values.shape[1]), np.float32)
            for c in range(values.shape[1]):
                out[:, c] = np.interp(grid, t, values[:, c])
            return out
        t = np.asarray(times[i0:i1])
        if kind == "video":
            n = tr.source.frames
            grid = start + (np.arange(n) + 0.5) * ((end - start) / n)
            pick = np.abs(t[None, :] - grid[:, None]).argmin(axis=1)
            frames = [tr.values[i0 + int(i)] for i in pick]
            if len({f.shape for f in frames}) > 1:
                raise DataFormatError(f"topic {tr.source.topic}: images of different sizes between "
                                      f"{start:.3f} and {end:.3f} s")
            return np.stack(frames)
        value = tr.values[i0 + int(np.abs(t - (start + end) / 2).argmin())]
        return np.asarray(value, np.float32).reshape(-1) if kind == "vector" else value
