"""``mmcl-edge bench learn``: what learning on cached taps saves, and learning beside serving.

Learning cost (default). One task of a workspace's scenario is learned two ways, with the same
adapters (the workspace's ``EncoderConfig`` / ``MMCLModel``, same seeded initialisation), the
same epochs, batch size, optimiser, schedule and samples, and a plain cross-entropy loss on the
gradient-trained head (a like-for-like training-cost comparison):

* ``taps``: what ``learn`` does. Taps are extracted once (preprocess + backbone in inference
  mode, into a fresh tap cache), then only the side network (adapters + head) trains;
* ``backprop``: the conventional "adapters inside the network" cost. Every step preprocesses the
  raw batch, runs the PyTorch backbone with autograd recording through it (its input requires a
  gradient, so every activation is kept and the gradient flows back through every layer; the
  backbone's weights are still not updated), then the same adapters, head and loss.

Each runs in its own fresh process (``python -m mmcl_edge.bench.learn worker``), so time and peak
resident memory (``ru_maxrss``) are that path's alone; ``rss_before_mb`` is what every path holds
before its timed part (Python, PyTorch, the scenario's raw data, the backbones). (b)'s time counts
its per-step preprocessing (``stages.preprocess_s``); ``ratio_seconds_without_step_preprocessing``
is the ratio had it preprocessed once and kept the inputs. A third process times the full method
(``AdapterLearner.learn_task``: all four losses, freezing, the ridge head) on cached taps, for
reference. ``--max-samples N`` keeps the first N of a seeded shuffle of the task's training
samples, identically for every path (said in the JSON).

Learning beside serving (``--while-serving``). A runtime process serves one test sample at batch
1 in a loop (a robot pipeline's cadence, as fast as it goes) and records every request's latency;
the full method learns the task alone (quiet), the runtime serves alone for ``serve_seconds``
(quiet), then the learner runs again while the runtime serves. Reported: learn time quiet vs
while serving, and the runtime's p50/p99 quiet vs while the learner process runs (its whole life:
start-up, tap extraction and training). ``thread_policy`` says whether ``mmcl_edge.threads``'
policy was in force in the children (``off``: library defaults, the "before").

    python -m mmcl_edge.bench.learn worker   # one path (a JSON spec on stdin, JSON lines on stdout)
    python -m mmcl_edge.bench.learn serve    # the serving loop (same protocol; "stop" on stdin ends it)
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from mmcl_edge.errors import MMCLError
from mmcl_edge.runtime.memory import peak_rss_mb, rss_mb

PATHS = ("taps", "backprop", "full")


class BenchFailed(MMCLError):
    """A benchmark child process failed in a way the user can act on (killed: out of memory)."""


# ---------------------------------------------------------------------------------------------
# child side
def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def task_indices(sc, task: int, max_samples: int | None, seed: int):
    """The training samples of ``task`` the bench uses: all, or the first ``max_samples`` of a
    seeded shuffle (in their original order), the same for every path."""
    import numpy as np

    idx = np.asarray(sc.tasks[task].train_idx)
    if max_samples and max_samples < len(idx):
        keep = np.random.default_rng(seed).permutation(len(idx))[:max_samples]
        idx = idx[np.sort(keep)]
    return idx


def _ce_train(model, cfg, n: int, y_all, batch_taps: Callable, on_step: Callable) -> float:
    """The plain cross-entropy loop both paths share (the learner's optimiser and schedule)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mmcl_edge.optim import OneCycleAdamW

    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = max(1, int(np.ceil(n / cfg.train.batch_size)))
    opt = OneCycleAdamW(params, max_lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                        total_steps=cfg.train.epochs * steps_per_epoch, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    loss_value = float("nan")
    model.train()
    for _ in range(cfg.train.epochs):
        order = torch.randperm(n, generator=gen).numpy()
        for b in range(0, n, cfg.train.batch_size):
            idx = order[b:b + cfg.train.batch_size]
            if len(idx) >= 2:
                logits, _ = model.training_logits(batch_taps(idx))
                loss = F.cross_entropy(logits, y_all[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_value = float(loss.detach())
            on_step()
    model.eval()
    return loss_value


def _grown(model, n_seen: int, seed: int):
    """The model with its head grown to ``n_seen`` outputs, the global RNG seeded (the new head rows and
    dropout draw from it): both plain-CE paths start from the same weights and draw the same masks."""
    import torch

    torch.manual_seed(seed)
    model.head.grow(n_seen - model.head.num_outputs)
    return model


def run_path(spec: dict, emit: Callable[[dict], None] = _emit) -> dict:
    """One path, in this (fresh) process. ``spec``: workspace, path, task, epochs, max_samples."""
    from mmcl_edge import threads

    threads.apply_env_defaults()  # before torch (a no-op for OpenMP when torch is already loaded)
    import numpy as np
    import torch

    from mmcl_edge.learners import AdapterLearner
    from mmcl_edge.learners.adapter import to_torch
    from mmcl_edge.preprocess import preprocess_batch
    from mmcl_edge.stream import TapSource, label_map
    from mmcl_edge.workspace import Workspace

    path, k = spec["path"], int(spec["task"])
    ws = Workspace.open(spec["workspace"])
    cfg = ws.config.override({"train.epochs": int(spec["epochs"])})
    in_force = threads.apply_torch(cfg.train.threads)
    sc = ws.scenario()
    idx = task_indices(sc, k, spec.get("max_samples"), cfg.train.seed)
    lmap = label_map(sc, k)
    n_seen = len(lmap) if sc.setting == "class-il" else sc.num_classes
    with tempfile.TemporaryDirectory(prefix="mmcl-bench-taps-") as cache:
        src = TapSource(sc, Path(cache))         # the backbones (not timed: the same for every path)
        learner = AdapterLearner(cfg, src.modality_taps, sc.setting, sc.num_classes)
        if path == "full" and k > 0:  # the full method continues from the state after the task before
            learner = AdapterLearner(cfg, src.modality_taps, sc.setting, sc.num_classes, model=ws.load_model(k - 1))
            learner.old = learner.model.teacher()
        steps = cfg.train.epochs * max(1, int(np.ceil(len(idx) / cfg.train.batch_size)))
        done = [0]

        def on_step():
            done[0] += 1
            emit({"progress": done[0], "total": steps})

        rss_before = rss_mb()
        stages: dict[str, float] = {}
        t0 = time.perf_counter()
        t_start = time.monotonic()
        info: dict = {}
        if path in ("taps", "full"):
            data, _, _ = src.taps("train", idx, lmap)
            stages["extract_s"] = time.perf_counter() - t0
        if path == "taps":
            t1 = time.perf_counter()
            model = _grown(learner.model, n_seen, cfg.train.seed)
            info["final_loss"] = _ce_train(model, cfg, len(data), torch.from_numpy(data.y).long(),
                                           lambda i: to_torch(data, i), on_step)
            stages["train_s"] = time.perf_counter() - t1
        elif path == "backprop":
            model = _grown(learner.model, n_seen, cfg.train.seed)
            samples = {m: [sc.train.samples[m][i] for i in idx] for m in sc.specs}
            y = torch.tensor([lmap[int(c)] for c in sc.train.y[idx]]).long()
            pre = [0.0]

            def batch_taps(i):
                taps = {}
                for m, spec_m in src.specs.items():
                    t = time.perf_counter()
                    x = torch.from_numpy(preprocess_batch([samples[m][j] for j in i], spec_m))
                    pre[0] += time.perf_counter() - t
                    x.requires_grad_(True)   # autograd records the whole backbone; the gradient reaches its input
                    taps[m] = list(src.backbones[m](x))
                return taps

            info["final_loss"] = _ce_train(model, cfg, len(idx), y, batch_taps, on_step)
            stages["preprocess_s"] = pre[0]
            stages["train_s"] = time.perf_counter() - t0 - pre[0]
        elif path == "full":
            t1 = time.perf_counter()
            rec = learner.learn_task(k, data, n_seen)
            stages["learn_s"] = time.perf_counter() - t1
            info["learn_task_train_seconds"] = rec["train_seconds"]
            emit({"progress": steps, "total": steps})
        else:
            raise ValueError(f"unknown path {path!r}")
        seconds = time.perf_counter() - t0
        t_end = time.monotonic()
    return {"path": path, "seconds": seconds, "stages": stages, "samples": int(len(idx)), "steps": steps,
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before, "threads": in_force,
            "start_monotonic": t_start, "end_monotonic": t_end, **info}


def serve_loop(spec: dict, emit: Callable[[dict], None] = _emit, lines=None) -> dict:
    """Serve one test sample at batch 1 until "stop" (or end of input) on ``lines`` (stdin)."""
    from mmcl_edge import threads
    from mmcl_edge.errors import WorkspaceError
    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.latency import workspace_test_samples

    root = Path(spec["workspace"])
    samples, why = workspace_test_samples(root)
    if samples is None:
        raise WorkspaceError(f"the workspace's test data cannot be loaded ({why})")
    sample = {m: v[0] for m, v in samples.items()}
    rt = Runtime(root)  # threads: the policy's (runtime/providers.py applies it)
    for _ in range(10):
        rt.predict(sample)
    stop = threading.Event()

    def watch():
        for line in (lines if lines is not None else sys.stdin):
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    emit({"ready": True})
    times, ms = [], []
    while not stop.is_set():
        t0 = time.perf_counter()
        rt.predict(sample)
        t1 = time.perf_counter()
        times.append(time.monotonic())
        ms.append(1e3 * (t1 - t0))
    return {"times": times, "ms": ms, "threads": {**threads.describe(), "serve_threads": threads.serve_threads()},
            "peak_rss_mb": peak_rss_mb()}


def _child_main(kind: str) -> int:
    spec = json.loads(sys.stdin.readline())
    result = run_path(spec) if kind == "worker" else serve_loop(spec)
    _emit({"result": result})
    return 0


# ---------------------------------------------------------------------------------------------
# parent side
class _Child:
    """``python -m mmcl_edge.bench.learn KIND`` with a JSON spec; reads its JSON lines."""

    def __init__(self, kind: str, spec: dict, policy: bool, on_line: Callable[[dict], None] | None = None):
        from mmcl_edge import threads

        self.kind, self.on_line = kind, on_line
        self.result: dict | None = None
        self.ready = threading.Event()
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "mmcl_edge.bench.learn", kind], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=threads.child_env(policy),
                                     cwd=tempfile.gettempdir())  # a checkout's mmcl_edge/ in the cwd must not shadow it
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "result" in msg:
                self.result = msg["result"]
            elif msg.get("ready"):
                self.ready.set()
            elif self.on_line:
                self.on_line(msg)
        self.ready.set()

    def stop(self) -> None:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def wait(self, what: str) -> dict:
        rc = self.proc.wait()
        self._reader.join()
        self.err.seek(0)
        tail = deque(self.err.read().splitlines(), maxlen=8)
        self.err.close()
        if rc != 0 or self.result is None:
            if rc < 0:
                raise BenchFailed(f"{what} was killed by signal {-rc}"
                                  + (" (out of memory?); try a smaller --max-samples" if rc == -9 else ""))
            raise RuntimeError(f"{what} failed (exit code {rc}): " + " | ".join(tail))
        return self.result


def _steps(spec: dict) -> int:
    n = spec["max_samples"] or spec["task_train_samples"]
    return spec["epochs"] * max(1, -(-n // spec["batch_size"]))


def _run_child(what: str, spec: dict, policy: bool, progress: Callable | None) -> dict:
    """One path in a fresh process, with a progress bar over its training steps."""
    from contextlib import nullcontext

    ctx = progress(what, _steps(spec)) if progress else nullcontext(None)
    with ctx as bar:
        seen = [0]

        def on_line(msg):
            if bar is not None and "progress" in msg:
                bar.advance(msg["progress"] - seen[0])
                seen[0] = msg["progress"]

        return _Child("worker", spec, policy, on_line).wait(what)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def _window(serve: dict, start: float, end: float) -> dict:
    ms = [m for t, m in zip(serve["times"], serve["ms"]) if start <= t <= end]
    return {"requests": len(ms), "seconds": end - start, "p50_ms": _percentile(ms, 50), "p99_ms": _percentile(ms, 99),
            "requests_per_s": len(ms) / (end - start) if end > start else None}


def _ratio(a, b):
    return None if a in (None, 0) or b is None else b / a


def check_workspace(root: Path, task: int, epochs: int | None, max_samples: int | None) -> dict:
    """Refuse what cannot run, in one line, before any child starts; returns the common spec."""
    from mmcl_edge.errors import ConfigError, WorkspaceError
    from mmcl_edge.workspace import Workspace

    ws = Workspace.open(root)
    sc = ws.scenario()
    if not 0 <= task < len(sc.tasks):
        raise WorkspaceError(f"--task {task} is out of range: this stream has tasks 0..{len(sc.tasks) - 1}")
    if task > 0 and not ws.state_paths(task - 1)[1].is_file():
        raise WorkspaceError(f"--task {task} starts from the state after task {task - 1}, which is not learned in {ws.root}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, not {epochs}")
    if max_samples is not None and max_samples < 2:
        raise ConfigError(f"--max-samples must be at least 2 (a training batch), not {max_samples}")
    n = len(sc.tasks[task].train_idx)
    return {"workspace": str(ws.root.resolve()), "task": task, "epochs": epochs or ws.config.train.epochs,
            "max_samples": max_samples if max_samples and max_samples < n else None,
            "task_train_samples": n, "scenario": sc.name, "setting": sc.setting, "modalities": sc.modalities,
            "batch_size": ws.config.train.batch_size, "has_pack": (ws.root / "current").is_file()}


def run_learn_bench(root: Path, task: int = 0, epochs: int | None = None, max_samples: int | None = None,
                    policy: bool = True, progress: Callable | None = None) -> dict:
    """The learning-cost comparison (taps vs back-propagating through the backbone, + the full method)."""
    spec = check_workspace(root, task, epochs, max_samples)
    results = {}
    for path, what in (("taps", "(a) cached taps"), ("backprop", "(b) backprop through backbone"),
                       ("full", "full method on taps")):
        results[path] = _run_child(what, {**spec, "path": path}, policy, progress)
    a, b = results["taps"], results["backprop"]
    out = {"command": "bench learn", **{k: spec[k] for k in ("workspace", "scenario", "setting", "modalities", "task",
                                                             "epochs", "batch_size", "task_train_samples")},
           "samples": a["samples"], "subsampled": spec["max_samples"] is not None,
           "max_samples": spec["max_samples"], "loss": "cross-entropy (paths a and b)",
           "thread_policy": "on" if policy else "off", "paths": {}}
    for name, r in results.items():
        out["paths"][name] = {k: r[k] for k in ("seconds", "stages", "peak_rss_mb", "rss_before_mb", "steps", "threads")
                              if k in r}
        for k in ("final_loss", "learn_task_train_seconds"):
            if k in r:
                out["paths"][name][k] = r[k]
    out["ratio_seconds"] = _ratio(a["seconds"], b["seconds"])
    # (b) if its inputs were preprocessed once and kept, rather than at every step (a data loader's way)
    out["ratio_seconds_without_step_preprocessing"] = _ratio(a["seconds"], b["seconds"] - b["stages"]["preprocess_s"])
    out["ratio_peak_rss"] = _ratio(a["peak_rss_mb"], b["peak_rss_mb"])
    return out


def run_while_serving(root: Path, task: int = 0, epochs: int | None = None, max_samples: int | None = None,
                      serve_seconds: float = 10.0, policy: bool = True, progress: Callable | None = None,
                      log: Callable[[str], None] | None = None) -> dict:
    """Learn time quiet vs beside a serving runtime; the runtime's latency quiet vs beside learning."""
    from mmcl_edge.errors import WorkspaceError

    spec = check_workspace(root, task, epochs, max_samples)
    if not spec["has_pack"]:
        raise WorkspaceError(f"{spec['workspace']} has no pack to serve yet; learn a task first ('mmcl-edge learn')")
    job = {**spec, "path": "full"}
    quiet = _run_child("learn alone", job, policy, progress)
    server = _Child("serve", {"workspace": spec["workspace"]}, policy)
    try:
        if not server.ready.wait(300) or server.proc.poll() is not None:
            server.stop()
            server.wait("the serving runtime")
            raise RuntimeError("the serving runtime did not start")
        if log:
            log(f"runtime serving alone for {serve_seconds:g} s")
        t0 = time.monotonic()
        time.sleep(serve_seconds)
        t1 = time.monotonic()
        busy = _run_child("learn while the runtime serves", job, policy, progress)
        t2 = time.monotonic()
    finally:
        server.stop()
    served = server.wait("the serving runtime")
    quiet_w = _window(served, t0, t1)
    busy_w = _window(served, busy["start_monotonic"], busy["end_monotonic"])
    whole_w = _window(served, t1, t2)
    q_learn, b_learn = quiet["stages"]["learn_s"], busy["stages"]["learn_s"]
    return {"command": "bench learn --while-serving",
            **{k: spec[k] for k in ("workspace", "scenario", "setting", "modalities", "task", "epochs", "batch_size",
                                    "task_train_samples")},
            "samples": quiet["samples"], "subsampled": spec["max_samples"] is not None,
            "max_samples": spec["max_samples"], "thread_policy": "on" if policy else "off",
            "learn": {"quiet_s": q_learn, "while_serving_s": b_learn, "ratio": _ratio(q_learn, b_learn),
                      "quiet_extract_s": quiet["stages"]["extract_s"],
                      "while_serving_extract_s": busy["stages"]["extract_s"],
                      "threads": busy["threads"]},
            "serve": {"quiet": quiet_w, "while_learning": busy_w, "while_learner_process": whole_w,
                      "p50_ratio": _ratio(quiet_w["p50_ms"], busy_w["p50_ms"]),
                      "p99_ratio": _ratio(quiet_w["p99_ms"], busy_w["p99_ms"]),
                      "threads": served["threads"], "peak_rss_mb": served["peak_rss_mb"]},
            "targets": {"learn_ratio_max": 2.0, "p99_ratio_max": 2.0}}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("worker", "serve"):
        sys.stderr.write("usage: python -m mmcl_edge.bench.learn worker|serve  (a JSON spec on stdin)\n")
        sys.exit(2)
    sys.exit(_child_main(sys.argv[1]))
