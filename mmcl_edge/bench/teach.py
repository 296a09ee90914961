"""``mmcl-edge bench teach``: a device taught task by task from folders, measured as a user meets it.

A built-in class-incremental stream is cut into task folders (the generic format, what an operator
would hand the device) with 1, 5 or all training samples per new class; each folder is taught with
``mmcl_edge.teaching.teach_folder`` (the CLI's path), so the gate, the held-out data and the packs
are the device's own. Reported per shot count: the accuracy matrix, forgetting, the gate's
decisions, and the same stream learned by two baselines on the same frozen taps (imprinting: the
nearest class mean, Coral's weight imprinting; ridge on frozen features). On UTD-MHAD a last task
brings known classes from a subject never seen (new conditions). Then, once:

- novelty: the pack after the first two thirds of the classes scores the held-out samples of the
  classes it learned against those of the classes it never saw (AUROC, false alarms at its threshold);
- teach-to-serve: a real ``serve --teach`` is sent the last task's samples over HTTP, asked to
  learn, and timed from the learn request to the first answer that names a new class, while a
  client keeps sending requests (serving p99 during learning vs quiet).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from mmcl_edge.data import load_scenario
from mmcl_edge.data.dataset import MultiModalDataset
from mmcl_edge.data.generic import read_task_folder, write_task_folder
from mmcl_edge.workspace import DEFAULT_MAX_FORGETTING, GATE_SIGNIFICANCE

BASELINES = {"imprinting": "simplecil", "ridge": "ridge"}


def task_folders(scenario, root: Path, shots: int | None, seed: int = 0, new_subject: bool = True) -> list[Path]:
    """The stream's tasks as folders; ``shots`` training samples per new class (None: all). With
    ``new_subject`` (a test split with domains), the first test subject is kept out of every
    held-out set and becomes a last task of known classes."""
    rng = np.random.default_rng(seed)
    test = scenario.test
    subject = None
    if new_subject and test.domain is not None:
        subject = int(np.unique(test.domain)[0])
        if not all((test.domain[t.test_idx] != subject).any() for t in scenario.tasks):
            subject = None  # a task would keep no held-out sample: no subject is set aside
    folders = []
    for k, task in enumerate(scenario.tasks):
        idx = task.train_idx
        if shots is not None:
            idx = np.concatenate([rng.permutation(idx[scenario.train.y[idx] == c])[:shots] for c in task.classes])
        held = task.test_idx if subject is None else task.test_idx[test.domain[task.test_idx] != subject]
        folders.append(write_task_folder(root / f"task{k:02d}", scenario.specs, scenario.train.subset(np.sort(idx)),
                                         scenario.class_names, test.subset(held)))
    if subject is not None:
        own = np.flatnonzero(test.domain == subject)
        folders.append(write_task_folder(root / "new-subject", scenario.specs, test.subset(own), scenario.class_names))
    return folders


def teach_all(ws_root: Path, folders: list[Path], epochs: int | None, progress=None, snapshot_at: int | None = None,
              snapshot=None) -> list[dict]:
    """Teach every folder in order; ``snapshot(ws_root)`` runs just before folder ``snapshot_at``."""
    from mmcl_edge.teaching import teach_folder

    overrides = {"train.epochs": epochs} if epochs else {}
    out = []
    for i, f in enumerate(folders):
        if snapshot is not None and i == snapshot_at:
            snapshot(ws_root)
        # the gate only measures here, so every method learns the same tasks and is tested on the
        # same held-out sets; what it would have decided with the default limit is reported
        _, result = teach_folder(ws_root, f, overrides=overrides, progress=progress, max_forgetting=None)
        out.append(result)
    return out


def would_refuse(gate: dict, limit: float = DEFAULT_MAX_FORGETTING) -> bool:
    """The default gate's decision on a task learned with the gate measuring only."""
    return bool(gate.get("measured_on")) and gate["drop_points"] > limit + 1e-9 and gate["p_value"] < GATE_SIGNIFICANCE


def baseline_stream(name: str, ws_root: Path, folders: list[Path]) -> dict:
    """A baseline learner on the same task folders and the workspace's own cached taps."""
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.learners import create_learner
    from mmcl_edge.stream import run_tasks
    from mmcl_edge.workspace import Workspace

    ws = Workspace.open(ws_root)
    src = ws.tap_source()
    tasks = [read_task_folder(f)[1] for f in folders]
    names = list(dict.fromkeys(n for t in tasks for c in np.unique(t.train.y) for n in [t.names[int(c)]]))
    learner = create_learner(BASELINES[name], LearnConfig(), src.modality_taps, "class-il", len(names))
    return run_tasks(tasks, learner, src).report()


def novelty_scores(ws_root: Path, known_tasks: int, fresh: Path | None = None) -> dict:
    """The model after ``known_tasks`` tasks scores samples of the classes it learned and of the
    classes it never saw, as its pack does (1 - top probability vs the manifest's threshold).

    ``fresh``: a task folder of samples used neither for learning nor for the threshold (the new
    subject); without it the workspace's held-out data is scored, which also set the threshold.
    """
    from mmcl_edge.learners import AdapterLearner
    from mmcl_edge.stream import task_taps
    from mmcl_edge.workspace import Workspace

    ws = Workspace.open(ws_root)
    model = ws.load_model(known_tasks - 1)
    learner = AdapterLearner(ws.config, ws.tap_source().modality_taps, ws.setting, 0, model=model)
    known = set(ws.class_names(known_tasks - 1))

    def novelty(data):
        logits = learner.logits(data)
        z = np.exp(logits - logits.max(1, keepdims=True))
        return 1.0 - (z / z.sum(1, keepdims=True)).max(1)

    if fresh is not None:
        _, task = read_task_folder(fresh)
        data = task_taps(ws.tap_source(), task, ws.class_names())[0]
        score = novelty(data)
        is_known = np.array([n in known for n in task.label_names(task.train)])
        s, u, where = score[is_known], score[~is_known], f"{fresh.name} (never learned from, never used for the threshold)"
    else:
        seen, unseen = [], []
        for k in range(ws.learned_tasks()):
            held = ws.heldout(k)
            if held is not None:
                (seen if k < known_tasks else unseen).append(novelty(held))
        s, u, where = np.concatenate(seen), np.concatenate(unseen), "held-out data (also what set the threshold)"
    thr = model.novelty.threshold
    return {"auroc": auroc(s, u), "seen_flagged": float(np.mean(s > thr)), "unseen_flagged": float(np.mean(u > thr)),
            "threshold": thr, "calibrated_on": model.novelty.source, "seen_samples": int(len(s)),
            "unseen_samples": int(len(u)), "known_classes": len(known), "measured_on": where}


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(a random novel sample scores above a random familiar one), ties half (Mann-Whitney U)."""
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ranks of ties
        m = allv == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# teach-to-serve over HTTP -------------------------------------------------------------------------
def _binary_request(arrays: dict[str, np.ndarray], parameters: dict | None = None) -> tuple[bytes, dict]:
    """A KServe v2 request with binary tensors (no JSON number lists: video clips are megabytes)."""
    inputs, blobs = [], []
    for m, a in arrays.items():
        a = np.ascontiguousarray(a, dtype="<f4")
        blobs.append(a.tobytes())
        inputs.append({"name": m, "shape": list(a.shape), "datatype": "FP32",
                       "parameters": {"binary_data_size": len(blobs[-1])}})
    header = json.dumps({"inputs": inputs, **({"parameters": parameters} if parameters else {})}).encode()
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header)),
                                      "Content-Type": "application/octet-stream"}


def _post(url: str, body: bytes, headers: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _get(url: str, headers: dict) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teach_to_serve(ws_root: Path, last_folder: Path, quiet_seconds: float = 8.0, deadline: float = 600.0,
                   warm: bool = False) -> dict:
    """Serve ``ws_root`` with ``--teach``; time from POST learn (the last task's samples posted
    first) to the first answer naming one of its new classes, with a client sending requests."""
    specs, task = read_task_folder(last_folder)
    known = set()
    from mmcl_edge.workspace import Workspace

    known = set(Workspace.open(ws_root).class_names())
    new = [n for n in task.names if n not in known and n in set(task.label_names(task.train))]
    token = secrets.token_urlsafe(24)
    token_file = Path(tempfile.mkdtemp(prefix="mmcl-teach-")) / "token"
    token_file.write_text(token)
    port = _free_port()
    base = f"http://127.0.0.1:{port}/v2/models/mmcl"
    cmd = [sys.executable, "-m", "mmcl_edge.cli.main", "serve", "-w", str(ws_root), "--port", str(port),
           "--provider", "cpu", "--poll", "0.1", "--teach", "--teach-token-file", str(token_file)] + (["--teach-warm"] if warm else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        end = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve --teach did not start: {proc.stderr.read()[-500:]}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > end:
                raise RuntimeError("serve --teach did not become ready")
            time.sleep(0.2)
        held = task.heldout if task.heldout is not None else task.train
        one = {m: np.stack([held.samples[m][0]]) for m in specs}
        probe_idx = [i for i, n in enumerate(task.label_names(held)) if n in new][:4]
        probe = {m: np.stack([held.samples[m][i] for i in probe_idx]) for m in specs}
        body_one, h_one = _binary_request(one)
        lat: list[tuple[float, float]] = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                t = time.perf_counter()
                _post(f"{base}/infer", body_one, h_one)
                lat.append((time.monotonic(), 1e3 * (time.perf_counter() - t)))

        th = threading.Thread(target=client, daemon=True)
        th.start()
        time.sleep(quiet_seconds)
        quiet_end = time.monotonic()
        labels = task.label_names(task.train)
        for name in dict.fromkeys(labels):
            rows = [i for i, n in enumerate(labels) if n == name]
            body, h = _binary_request({m: np.stack([task.train.samples[m][i] for i in rows]) for m in specs},
                                      {"label": name})
            status, ack = _post(f"{base}/samples", body, {**h, **auth})
            if status != 200:
                raise RuntimeError(f"POST samples answered {status}: {ack}")
        t0 = time.monotonic()
        status, job = _post(f"{base}/learn", b"{}", {"Content-Type": "application/json", **auth})
        if status != 200:
            raise RuntimeError(f"POST learn answered {status}: {job}")
        body_probe, h_probe = _binary_request(probe)
        first_answer = published = None
        state = {}
        def job_ended() -> bool:
            nonlocal state, published
            state = _get(f"{base}/learn/{job['id']}", auth)
            if state["state"] in ("published", "refused", "failed"):
                published = time.monotonic()
            return published is not None

        while time.monotonic() - t0 < deadline:
            if published is None and job_ended() and state["state"] != "published":
                break
            status, out = _post(f"{base}/infer", body_probe, h_probe)
            got = next(o for o in out["outputs"] if o["name"] == "labels")["data"] if status == 200 else []
            if any(g in new for g in got):
                first_answer = time.monotonic()
                break
            time.sleep(0.05)
        # the watcher may serve the new pack before the learner has marked its job published
        while published is None and time.monotonic() - t0 < deadline and not job_ended():
            time.sleep(0.05)
        learn_end = published or time.monotonic()
        stop.set()
        th.join(timeout=60)
        quiet = [ms for t, ms in lat if t <= quiet_end]
        during = [ms for t, ms in lat if t0 <= t <= learn_end]
        p99 = lambda v: float(np.percentile(v, 99)) if v else None  # noqa: E731
        return {"job": state, "new_classes": new, "samples_posted": len(labels),
                "teach_to_serve_seconds": None if first_answer is None else first_answer - t0,
                "learn_seconds": None if published is None else published - t0,
                "quiet_p99_ms": p99(quiet), "learning_p99_ms": p99(during),
                "p99_ratio": (p99(during) / p99(quiet)) if quiet and during else None,
                "quiet_requests": len(quiet), "learning_requests": len(during)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_teach_bench(scenario: str, data_dir: str | None, shots: list[int | None], work: Path, epochs: int | None = None,
                    seed: int = 0, serve: bool = True, say: Callable[[str], None] = print, progress=None,
                    new_subject: bool = True, warm: bool = False) -> dict:
    sc = load_scenario(scenario, data_dir=data_dir, seed=seed)
    work.mkdir(parents=True, exist_ok=True)
    result = {"scenario": scenario, "seed": seed, "epochs": epochs, "new_subject_task": new_subject,
              "teach_warm": warm, "runs": {}}
    for k in shots:
        label = "all" if k is None else str(k)
        root = work / f"shots-{label}"
        shutil.rmtree(root, ignore_errors=True)
        folders = task_folders(sc, root / "tasks", k, seed, new_subject)
        # one tap cache for every run (content-addressed: the same sample's taps are reused, never mixed)
        (root / "ws").mkdir(parents=True)
        (work / "taps").mkdir(exist_ok=True)
        (root / "ws" / "taps").symlink_to((work / "taps").resolve(), target_is_directory=True)
        say(f"{scenario}, {label} sample(s) per new class: {len(folders)} task folders")
        copy = root / "ws-before-last"
        t = time.perf_counter()
        last_new = len(sc.tasks) - 1  # the last task that brings new classes: taught live, over HTTP
        outcomes = teach_all(root / "ws", folders, epochs, progress, last_new,
                             (lambda ws: shutil.copytree(ws, copy)) if serve and k == 5 else None)
        from mmcl_edge.workspace import Workspace

        report = Workspace.open(root / "ws").report()
        run = {"mmcl": {k2: report.get(k2) for k2 in ("final_average_accuracy", "average_incremental_accuracy",
                                                     "forgetting", "accuracy_matrix")},
               "teach_seconds": time.perf_counter() - t,
               "gate": [{"task": i, "would_refuse": would_refuse(o["gate"]), "drop_points": o["gate"].get("drop_points"),
                         "p_value": o["gate"].get("p_value")} for i, o in enumerate(outcomes)]}
        for name in BASELINES:
            rep = baseline_stream(name, root / "ws", folders)
            run[name] = {k2: rep.get(k2) for k2 in ("final_average_accuracy", "average_incremental_accuracy",
                                                    "forgetting", "accuracy_matrix")}
        say(f"  mmcl {100 * run['mmcl']['final_average_accuracy']:.1f}  imprinting "
            f"{100 * run['imprinting']['final_average_accuracy']:.1f}  ridge {100 * run['ridge']['final_average_accuracy']:.1f}"
            f"  gate would refuse tasks {[g['task'] for g in run['gate'] if g['would_refuse']]}")
        if k is None:
            known = (2 * len(sc.tasks)) // 3
            run["novelty"] = novelty_scores(root / "ws", known,
                                            folders[-1] if len(folders) > len(sc.tasks) else None)
            say(f"  novelty after {known} tasks: {run['novelty']}")
        if serve and k == 5:
            run["teach_to_serve"] = teach_to_serve(copy, folders[last_new], warm=warm)
            say(f"  teach-to-serve: {run['teach_to_serve']}")
        result["runs"][label] = run
    return result
