"""Soak test: the runtime serving under load for minutes while the learner keeps publishing packs.

Why it exists: the unit tests show that one hot swap is safe; a device serves for weeks while
tasks are learned and packs swapped in under it. ``mmcl-edge bench soak`` runs that for N
minutes and counts what goes wrong: client threads call ``Runtime.predict`` in a loop on the
workspace's test samples (every answer is checked: its labels must be the serving pack's label
names), the watcher follows ``WS/current``, and a learner in a child process re-learns the
workspace's last task over and over (``learn(task=last, force=True)``), publishing a new pack each
time. It reports requests, failures, swaps, latency percentiles and the resident memory of the
serving process at the start, after a warm-up and at the end (growth after warm-up = a leak).

The serving process stays torch-free (the learner runs in its own process, on one torch thread),
so the memory measured is the runtime's own, as on an inference-only device. The harness itself
keeps only fixed-size state (latency histograms, the first few errors), so it does not grow either.

Note: the soak re-learns the workspace's last task; its packs accumulate in ``WS/packs``. Soak a
copy of a workspace whose packs or state you care about.

    python -m mmcl_edge.bench.soak learner WS     # the learner loop alone (what the soak starts)
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

from mmcl_edge.runtime.memory import rss_mb

MAX_ERRORS = 5                       # failure messages kept (the count is exact)
_LO_MS, _RATIO, _BINS = 0.01, 1.02, 1000   # latency histogram: 0.01 ms .. ~4e6 ms, 2% wide bins
_LOG_RATIO = math.log(_RATIO)


def _bin(ms: float) -> int:
    if ms <= _LO_MS:
        return 0
    return min(_BINS - 1, int(math.log(ms / _LO_MS) / _LOG_RATIO))


def hist_percentile(hist, q: float) -> float | None:
    """The ``q``-quantile (0..1) of a latency histogram, ms (the bin's geometric middle: within ~1%)."""
    total = sum(hist)
    if not total:
        return None
    need, seen = q * total, 0
    for b, c in enumerate(hist):
        seen += c
        if c and seen >= need:
            return _LO_MS * _RATIO ** (b + 0.5)
    return _LO_MS * _RATIO ** (_BINS - 0.5)


def check_answer(pred, batch: int, names: list[str] | None) -> str | None:
    """Why an answer is malformed, or None. ``names``: the label names of the pack that answered."""
    if names is None:
        return f"answered by pack v{pred.pack_version:04d}, whose manifest cannot be read"
    probs = np.asarray(pred.probabilities)
    if len(pred.labels) != batch or probs.shape != (batch, len(names)):
        return (f"pack v{pred.pack_version:04d}: {len(pred.labels)} labels, probabilities {probs.shape} "
                f"for {batch} sample(s) and {len(names)} classes")
    if not np.isfinite(probs).all() or np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        return f"pack v{pred.pack_version:04d}: probabilities are not a distribution"
    for label, i, s in zip(pred.labels, pred.indices, pred.scores):
        if not 0 <= int(i) < len(names) or label != names[int(i)]:
            return f"pack v{pred.pack_version:04d}: label {label!r} (index {int(i)}) is not among {names}"
        if not 0.0 <= float(s) <= 1.0:
            return f"pack v{pred.pack_version:04d}: score {float(s)} outside [0, 1]"
    return None


class _Errors:
    """The first few failure messages (bounded) and the exact count."""

    def __init__(self):
        self.first: list[str] = []
        self._lock = threading.Lock()

    def add(self, message: str) -> None:
        if len(self.first) < MAX_ERRORS:
            with self._lock:
                if len(self.first) < MAX_ERRORS:
                    self.first.append(message[:500])


class _Client(threading.Thread):
    """Calls ``rt.predict`` on one sample at a time until ``stop`` is set; counts and checks."""

    def __init__(self, rt, inputs: Callable[[int], dict], offset: int, stop: threading.Event,
                 names_of: Callable[[int], list[str] | None], errors: _Errors):
        super().__init__(name=f"soak-client-{offset}", daemon=True)
        self.rt, self.inputs, self.offset, self.stop = rt, inputs, offset, stop
        self.names_of, self.errors = names_of, errors
        self.requests = self.failures = 0
        self.hist = [0] * _BINS
        self.max_ms = 0.0

    def run(self) -> None:
        i = self.offset
        while not self.stop.is_set():
            x = self.inputs(i)
            i += 7919  # a prime stride: threads walk the samples in different orders
            t0 = time.perf_counter()
            try:
                pred = self.rt.predict(x)
                ms = 1e3 * (time.perf_counter() - t0)
                problem = check_answer(pred, 1, self.names_of(pred.pack_version))
            except Exception as exc:  # any exception is a failed request
                problem = f"{type(exc).__name__}: {exc}"
            self.requests += 1
            if problem is not None:
                self.failures += 1
                self.errors.add(problem)
            else:
                self.hist[_bin(ms)] += 1
                self.max_ms = max(self.max_ms, ms)


class _Learner:
    """The child process that re-learns the last task in a loop; its output is kept (last lines)."""

    def __init__(self, root: Path, command: list[str] | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = command or [sys.executable, "-m", "mmcl_edge.bench.soak", "learner", str(root)]
        # its own session: a Ctrl-C in the terminal reaches the soak only, which then stops the learner
        # between tasks; stdin is its lifeline (closed: stop), so it also stops if the soak dies
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True, start_new_session=True,
                                     cwd=tempfile.gettempdir())  # a checkout's mmcl_edge/ in the cwd must not shadow it
        self.tail: deque[str] = deque(maxlen=20)
        self.published = 0
        self._reader = threading.Thread(target=self._read, name="soak-learner-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip()
            if line:
                self.tail.append(line[:300])
            if line.startswith("published "):
                self.published += 1

    def stop(self, grace: float) -> int | None:
        """Ask it to stop after the task in progress; kill it after ``grace`` seconds. Its exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: no more waiting
                self.tail.append(f"(soak: learner killed, it did not stop within {grace:.0f}s)")
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


def run_soak(root, minutes: float, threads: int = 4, samples: dict | None = None, *, providers=None,
             progress: Callable[[dict], None] | None = None, progress_every: float = 10.0,
             stop_grace: float = 120.0, learner_command: list[str] | None = None) -> dict:
    """Serve from ``threads`` client threads for ``minutes`` while a child process re-learns the last task.

    ``samples``: ``{modality: sequence of raw samples}`` (the workspace's test set); None: random
    inputs of the right shapes. ``progress`` gets a snapshot dict every ``progress_every`` seconds.
    Ctrl-C ends the soak early: the learner is stopped, the watcher too, and the result (with
    ``interrupted: true``) is still returned.
    """
    from mmcl_edge.runtime import Runtime, layout
    from mmcl_edge.runtime.errors import RuntimeUserError
    from mmcl_edge.runtime.latency import example_inputs

    root = layout.resolve_root(root)
    if minutes <= 0 or threads < 1:
        raise RuntimeUserError("--minutes must be > 0 and --threads >= 1")
    rss_start = rss_mb()
    rt = Runtime(root, providers=providers)
    if samples is None:
        fixed = example_inputs(rt, 1)
        inputs = lambda i: fixed  # noqa: E731
        source = "random"
    else:
        samples = {m: s for m, s in samples.items() if m in rt.backbones.modalities}
        n = min(len(s) for s in samples.values())
        if not n:
            raise RuntimeUserError(f"{root}: the workspace's test set is empty")
        inputs = lambda i: {m: [s[i % n]] for m, s in samples.items()}  # noqa: E731
        source = "test"

    names: dict[int, list[str] | None] = {}

    def names_of(version: int) -> list[str] | None:
        got = names.get(version)
        if got is None:
            pack = rt.pack
            if pack.version == version:
                got = list(pack.label_names)
            else:
                try:
                    manifest = json.loads((root / layout.PACKS_DIR / layout.pack_name(version) / "manifest.json")
                                          .read_text())
                    got = [str(x) for x in manifest["label_names"]]
                except (OSError, ValueError, KeyError, TypeError):
                    return None
            if len(names) > 64:  # bounded: only recent packs answer
                names.clear()
            names[version] = got
        return got

    versions_before = set(layout.pack_versions(root))
    pack_start = rt.pack.version
    seconds = 60.0 * minutes
    # Warm-up: the first 10% of the run, at least 20 s (never more than half of a short run). The
    # runtime's arenas keep growing for the first minute under 4 threads and three backbones
    # (measured: 299 MB at 20 s, 333 MB at 40 s, then 339 MB flat): growth after a 20-s warm-up
    # on a 10-minute soak read 13%, against 1.8% from 40 s on.
    warmup = min(max(0.1 * seconds, 20.0), 0.5 * seconds)
    stop, errors = threading.Event(), _Errors()
    rt.start_watcher()
    learner = _Learner(root, learner_command)
    clients = [_Client(rt, inputs, k, stop, names_of, errors) for k in range(threads)]
    start = time.perf_counter()
    for c in clients:
        c.start()

    def snapshot() -> dict:
        hist = [sum(col) for col in zip(*(c.hist for c in clients))]
        return {"elapsed_s": time.perf_counter() - start, "requests": sum(c.requests for c in clients),
                "failures": sum(c.failures for c in clients), "swaps": rt.swaps,
                "packs_published": len(set(layout.pack_versions(root)) - versions_before),
                "p99_ms": hist_percentile(hist, 0.99), "rss_mb": rss_mb(), "pack": rt.pack.version,
                "learner_running": learner.proc.poll() is None, "learner_exit_code": learner.proc.poll()}

    rss_warm, rss_peak, interrupted = None, rss_start or 0.0, False
    next_report = progress_every
    try:
        if progress:
            progress(snapshot())  # the first line: serving has started
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
            if rss_warm is None and elapsed >= warmup:
                rss_warm = rss_mb()
            due = [seconds, next_report] + ([warmup] if rss_warm is None else [])
            time.sleep(max(0.0, min(min(due) - elapsed, 1.0)))
            if time.perf_counter() - start >= next_report:
                next_report += progress_every
                snap = snapshot()
                rss_peak = max(rss_peak, snap["rss_mb"] or 0.0)
                if progress:
                    progress(snap)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=30)
        elapsed = time.perf_counter() - start
        rss_end = rss_mb()
        try:
            learner_code = learner.stop(stop_grace if not interrupted else min(stop_grace, 15.0))
        except KeyboardInterrupt:
            learner.proc.kill()
            learner_code = learner.proc.wait()
        rt.stop()
    if rss_warm is None:  # interrupted during the warm-up
        rss_warm = rss_end
    rss_peak = max(rss_peak, rss_end or 0.0)
    hist = [sum(col) for col in zip(*(c.hist for c in clients))]
    requests = sum(c.requests for c in clients)
    growth = (100.0 * (rss_end - rss_warm) / rss_warm) if rss_end and rss_warm else None
    rnd = lambda v, d=3: None if v is None else round(v, d)  # noqa: E731
    return {
        "workspace": str(root), "minutes": minutes, "threads": threads, "inputs": source,
        "providers": rt.providers, "seconds": round(elapsed, 2), "interrupted": interrupted,
        "requests": requests, "failures": sum(c.failures for c in clients),
        "requests_per_s": round(requests / elapsed, 1) if elapsed > 0 else None,
        "swaps": rt.swaps, "rejected_packs": len(rt.rejections),
        "rejections": [f"{r.pack}: {r.reason}"[:300] for r in rt.rejections[:MAX_ERRORS]],
        "packs_published": len(set(layout.pack_versions(root)) - versions_before),
        "pack_start": pack_start, "pack_end": rt.pack.version,
        "p50_ms": rnd(hist_percentile(hist, 0.50)), "p99_ms": rnd(hist_percentile(hist, 0.99)),
        "max_ms": rnd(max((c.max_ms for c in clients), default=0.0)),
        "warmup_seconds": round(warmup, 1), "rss_start_mb": rnd(rss_start, 1), "rss_warm_mb": rnd(rss_warm, 1),
        "rss_end_mb": rnd(rss_end, 1), "rss_peak_mb": rnd(rss_peak, 1),
        "rss_growth_after_warmup_pct": rnd(growth, 2),
        "learner_exit_code": learner_code, "learner_output_tail": list(learner.tail)[-10:],
        "server_torch_loaded": "torch" in sys.modules,
        "errors": list(errors.first),
    }


# the learner child ------------------------------------------------------------------------------
def learner_loop(root, stop: threading.Event, log: Callable[[str], None] = print) -> int:
    """Re-learn the workspace's last learned task until ``stop`` is set (checked between tasks).

    One torch thread (an in-memory override: ``workspace.json`` is not rewritten). Each round
    publishes a new pack and points ``WS/current`` at it. Returns the rounds done.
    """
    from mmcl_edge.errors import WorkspaceError
    from mmcl_edge.runtime import layout
    from mmcl_edge.workspace import Workspace

    ws = Workspace.open(root)
    ws.config = ws.config.override({"train.threads": 1})
    ws.log = lambda note: log(f"recovered: {note}")
    rounds = 0
    while not stop.is_set():
        done = ws.learned_tasks()
        if done == 0:
            raise WorkspaceError(f"nothing learned yet in {ws.root}; the soak re-learns the last learned task")
        t0 = time.perf_counter()
        ws.learn(task=done - 1, force=True)
        rounds += 1
        log(f"published {layout.read_current(ws.root)} (task {done - 1} re-learned in {time.perf_counter() - t0:.1f}s)")
    return rounds


def _learner_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "learner":
        print("usage: python -m mmcl_edge.bench.soak learner WORKSPACE", file=sys.stderr)
        return 2
    stop = threading.Event()

    def lifeline():  # the soak closes our stdin to stop us (or dies, which closes it too)
        try:
            sys.stdin.read()
        except (OSError, ValueError):
            pass
        stop.set()

    threading.Thread(target=lifeline, name="soak-lifeline", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    from mmcl_edge.errors import MMCLError

    try:
        learner_loop(argv[1], stop, log=lambda s: print(s, flush=True))
    except MMCLError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_learner_main(sys.argv[1:]))
