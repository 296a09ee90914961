"""Latency of the runtime as a robotics pipeline sees it: per-stage percentiles, throughput, swap time.

Torch-free, so it runs on the inference-only device itself. (``mmcl-edge bench latency`` adds the
PyTorch-eager comparison where PyTorch is installed.)
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

from mmcl_edge.runtime.errors import RuntimeUserError
from mmcl_edge.runtime.service import Runtime


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


class _TimedSession:
    """Stands in for an onnxruntime session while ``measure_predict`` runs: adds the wall time of
    each ``run`` (the C++ call) to ``spent[thread id]``, so the rest of a request is the runtime's
    own Python. In lanes (``BackboneSet.lanes``) the busiest thread's time is the one that counts."""

    def __init__(self, session, spent: dict[int, float]):
        self._session, self._spent = session, spent

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            me = threading.get_ident()
            self._spent[me] = self._spent.get(me, 0.0) + time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._session, name)


def _timed_sessions(rt: Runtime, spent: dict[int, float]):
    """Wrap every session a request can run (backbones and the serving pack); returns the undo.
    None where a backbone is not an onnxruntime session (a TensorRT engine): then nothing is wrapped."""
    runners = list(rt.backbones._runners.values())
    if not all(hasattr(r, "session") for r in runners):
        return None
    pack = rt.pack
    for holder in (*runners, pack):
        holder.session = _TimedSession(holder.session, spent)

    def undo():
        for holder in (*runners, pack):
            holder.session = holder.session._session
    return undo


def measure_predict(rt: Runtime, inputs: dict, repeats: int = 50, warmup: int = 30) -> dict:
    """Per-stage latency (ms) of ``rt.predict(inputs)`` over ``repeats`` calls, its wall time as a
    caller sees it (``end_to_end_ms``: the stages' ``total`` stops before the softmax and the answer
    is built), and the runtime's per-request Python overhead: end to end minus preprocessing minus
    the time inside onnxruntime's ``run`` calls (``python_overhead_ms``; ``sessions_ms``: inside; in
    lanes, the busiest thread's)."""
    for _ in range(warmup):
        rt.predict(inputs)
    stages: dict[str, list[float]] = {}
    sessions, overhead, wall_ms = [], [], []
    spent: dict[int, float] = {}
    undo = _timed_sessions(rt, spent)
    start = time.perf_counter()
    try:
        for _ in range(repeats):
            spent.clear()
            t0 = time.perf_counter()
            t = rt.predict(inputs).timings_ms
            wall_ms.append(1e3 * (time.perf_counter() - t0))
            for k, v in t.items():
                stages.setdefault(k, []).append(v)
            if undo is not None:
                busiest = 1e3 * max(spent.values(), default=0.0)
                sessions.append(busiest)
                overhead.append(wall_ms[-1] - t["preprocess"] - busiest)
    finally:
        wall = time.perf_counter() - start
        if undo is not None:
            undo()
    batch = len(rt.predict(inputs).labels)
    out = {"batch": batch, "stages_ms": {k: percentiles(v) for k, v in stages.items()},
           "end_to_end_ms": percentiles(wall_ms), "throughput_samples_per_s": batch * repeats / wall}
    out["p99_over_p50"] = {k: v["p99"] / v["p50"] for k, v in (*out["stages_ms"].items(),
                                                              ("end_to_end", out["end_to_end_ms"]))}
    if undo is not None:
        out["sessions_ms"] = percentiles(sessions)
        out["python_overhead_ms"] = percentiles(overhead)
    return out


def servable_packs(rt: Runtime, n: int = 2) -> list[Path]:
    """The newest ``n`` packs made for the backbones this runtime serves: their identities (after
    ``export --precision`` the older packs are for the other precision and would be refused) and,
    where a pack names them, their files (after ``export --force`` wrote them in other bytes)."""
    mine = {m: e["identity"] for m, e in rt.backbones.index.items()}
    files = {m: e.get("sha256") for m, e in rt.backbones.index.items()}
    found = []
    for folder in sorted((rt.root / "packs").glob("v[0-9]*"), reverse=True):
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            if manifest.get("backbones") == mine and manifest.get("backbone_files", files) == files:
                found.append(folder)
        except (OSError, ValueError):
            continue
        if len(found) == n:
            break
    return found[::-1]


def measure_swap(rt: Runtime, packs: list, repeats: int = 5) -> dict:
    """Time to validate + warm + swap in a pack (the serving path is never blocked meanwhile)."""
    ms = []
    for i in range(repeats):
        t0 = time.perf_counter()
        rt.swap(packs[i % len(packs)])
        ms.append(1e3 * (time.perf_counter() - t0))
    return percentiles(ms)


def workspace_test_samples(root) -> tuple[dict | None, str]:
    """The workspace's test samples per modality, loaded without PyTorch; ``(None, why)`` when the
    data is not here (a deployed copy of a workspace)."""
    from mmcl_edge.data import DataFormatError, load_scenario

    s = json.loads((Path(root) / "workspace.json").read_text())["source"]
    if s.get("taught"):
        return None, "a workspace taught task by task keeps no data set"
    try:
        sc = load_scenario(s.get("scenario"), data=s.get("data"), data_dir=s.get("data_dir"),
                           setting=s.get("setting") or "class-il", classes_per_task=s.get("classes_per_task") or 2,
                           seed=s.get("seed") or 0)
    except ImportError as exc:
        return None, f"{exc.name} is not installed"
    except (DataFormatError, OSError) as exc:
        return None, str(exc)
    return sc.test.samples, ""


def batch_of(samples: dict, b: int) -> dict[str, list]:
    """The first ``b`` test samples of every modality (repeating when there are fewer)."""
    n = len(next(iter(samples.values())))
    return {m: [s[i % n] for i in range(b)] for m, s in samples.items()}


def example_inputs(rt: Runtime, batch: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Random raw samples of the shapes each modality takes (for timing where no test data is at hand)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for m, e in rt.backbones.index.items():
        spec = rt.backbones.specs[m]
        if spec.kind == "text":  # enough words to fill max_tokens: the slowest text there is
            words = np.array("the a fabric fits well size colour dress small large soft warm love return".split())
            inputs[m] = [" ".join(rng.choice(words, size=int(spec.options["max_tokens"]))) for _ in range(batch)]
            continue
        if spec.kind == "vector":
            shape = tuple(e["input_shape"])
        elif spec.kind == "image":
            shape = (spec.image_size, spec.image_size)
        elif spec.kind == "audio":
            shape = (int(spec.sample_rate * spec.clip_seconds),)
        elif spec.kind == "timeseries":  # rocket and raw backbones read [channels, length]
            shape = (spec.series_length, e["input_shape"][0] if spec.encoding in ("rocket", "raw") else 3)
        elif spec.kind == "video":
            shape = (spec.frames, spec.image_size, spec.image_size)
        else:
            raise RuntimeUserError(f"no example input for modality kind {spec.kind!r}")
        inputs[m] = [rng.random(shape, dtype=np.float32) for _ in range(batch)]
    return inputs


# The sessions end to end is held to: "plain" is what a user would time first, so the runtime's ratio
# to it is not flattered by the runtime's own settings; "two-threads-no-spin" is issue #19's own
# reference (2 intra-op threads, idle threads asleep, like the runtime's); "runtime" is the runtime's
# own sessions.
BARE_SESSIONS = ("plain", "two-threads-no-spin", "runtime")


def plain_session(path, providers: list[str] | None = None, spinning: bool = True):
    """The plainest session a user could write, ``onnxruntime.InferenceSession(path)``: onnxruntime's
    defaults (every graph optimisation, one intra-op thread per physical core, idle threads spinning);
    ``spinning=False``: two intra-op threads whose idle time is spent asleep, the rest the same."""
    import onnxruntime as ort

    opts = None
    if not spinning:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def measure_bare_backbones(rt: Runtime, inputs: dict, repeats: int = 50, warmup: int = 30,
                           sessions: str = "plain") -> dict[str, dict]:
    """Each backbone alone on already-preprocessed input (ms): the floor end to end is held to, in
    the ``sessions`` of BARE_SESSIONS."""
    if sessions not in BARE_SESSIONS:
        raise ValueError(f"sessions must be one of {BARE_SESSIONS}, got {sessions!r}")
    out = {}
    for m in rt.backbones.modalities:
        if m not in inputs:
            continue
        x = rt.backbones.preprocess(m, inputs[m])
        if sessions != "runtime":
            entry = rt.backbones.index[m]
            sess = plain_session(rt.backbones.folder / entry["file"], rt.providers, spinning=sessions == "plain")
            feed = {entry["input"]: np.ascontiguousarray(x, dtype=np.float32)}
            run = lambda: sess.run(None, feed)  # noqa: E731
        else:
            run = lambda: rt.backbones.run(m, x)  # noqa: E731
        for _ in range(warmup):
            run()
        ms = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            ms.append(1e3 * (time.perf_counter() - t0))
        out[m] = percentiles(ms)
        run = sess = None  # a plain session's spinning threads go with it
    return out


def measure_swaps(rt: Runtime, packs: list, inputs: dict, swaps: int = 1000, threads: int = 4,
                  baseline_seconds: float = 5.0, progress=None) -> dict:
    """Hot swaps under load: ``threads`` request threads call ``predict`` nonstop, first for
    ``baseline_seconds`` with no swap (the reference), then while ``swaps`` swaps alternate between
    ``packs``. Every failed request is counted; every answer must come from one of ``packs``.

    Returns swap time (validate + warm + switch, and each part), request latency in both phases
    and their ratio, and the failures.
    """
    versions = {int(json.loads((p / "manifest.json").read_text())["version"]) for p in packs}
    versions.add(rt.pack.version)
    phase = {"name": "baseline"}
    stop = threading.Event()
    lat: dict[str, list[float]] = {"baseline": [], "swapping": []}
    failures: list[str] = []
    failed = [0]
    foreign = [0]
    lock = threading.Lock()

    def worker():
        while not stop.is_set():
            name = phase["name"]
            t0 = time.perf_counter()
            try:
                pred = rt.predict(inputs)
                ms = 1e3 * (time.perf_counter() - t0)
                with lock:
                    lat[name].append(ms)
                    foreign[0] += pred.pack_version not in versions
            except Exception as exc:  # counted: a swap must never fail a request
                with lock:
                    failed[0] += 1
                    if len(failures) < 5:
                        failures.append(repr(exc))

    for _ in range(5):  # first requests pay one-off costs (CUDA kernels, algorithm search): not a swap's fault
        rt.predict(inputs)
    workers = [threading.Thread(target=worker, name=f"mmcl-bench-req{i}", daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    time.sleep(baseline_seconds)
    phase["name"] = "swapping"
    total, parts = [], {}
    rejected = 0
    start = time.perf_counter()
    for i in range(swaps):
        t0 = time.perf_counter()
        try:
            new = rt.swap(packs[i % len(packs)])
        except Exception as exc:
            rejected += 1
            if len(failures) < 5:
                failures.append(f"swap: {exc!r}")
            continue
        total.append(1e3 * (time.perf_counter() - t0))
        for k, v in new.load_ms.items():
            parts.setdefault(k, []).append(v)
        if progress:
            progress(i + 1, swaps)
    swap_seconds = time.perf_counter() - start
    stop.set()
    for w in workers:
        w.join(timeout=30)
    base, during = lat["baseline"], lat["swapping"]
    result = {
        "threads": threads, "swaps": swaps, "swaps_done": len(total), "swaps_rejected": rejected,
        "swap_ms": percentiles(total) if total else None,
        "swap_parts_ms": {k: percentiles(v) for k, v in parts.items()},
        "requests": {"baseline": len(base), "swapping": len(during)},
        "baseline_seconds": baseline_seconds, "swapping_seconds": swap_seconds,
        "request_ms": {"baseline": percentiles(base) if base else None,
                       "swapping": percentiles(during) if during else None},
        "failed_requests": failed[0], "answers_from_other_packs": foreign[0], "failures": failures,
    }
    if base and during:
        result["request_p99_ratio"] = result["request_ms"]["swapping"]["p99"] / result["request_ms"]["baseline"]["p99"]
    return result


def runtime_footprint(root, inputs: dict, providers=None, threads: int = 0, repeats: int = 20) -> dict:
    """Resident memory of a runtime alone, in a fresh process (no PyTorch, no benchmark state):
    its backbones and pack loaded and ``repeats`` predictions made on ``inputs`` (one sample per
    modality). Returns ``{"rss_mb", "peak_rss_mb"}``."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        arrays = os.path.join(tmp, "inputs.npz")
        np.savez(arrays, **{m: np.asarray(v) for m, v in inputs.items()})
        args = json.dumps({"root": str(root), "inputs": arrays, "providers": providers, "threads": threads,
                           "repeats": repeats})
        # cwd: a neutral folder, so a source checkout's mmcl_edge/ in the caller's cwd cannot shadow the package
        proc = subprocess.run([sys.executable, "-c", "from mmcl_edge.runtime.latency import _footprint_child as f; f()",
                               args], capture_output=True, text=True, timeout=600, cwd=tmp)
    if proc.returncode != 0:
        raise RuntimeUserError(f"the memory probe failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _footprint_child() -> None:
    import sys

    from mmcl_edge.runtime.memory import peak_rss_mb, rss_mb

    a = json.loads(sys.argv[1])
    with np.load(a["inputs"]) as z:
        inputs = {m: z[m] for m in z.files}
    rt = Runtime(a["root"], providers=a["providers"], threads=a["threads"])
    for _ in range(a["repeats"]):
        rt.predict(inputs)
    print(json.dumps({"rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(),
                      "torch_loaded": "torch" in sys.modules}))
