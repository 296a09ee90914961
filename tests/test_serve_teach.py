"""``serve --teach``: a running service is taught new classes over HTTP and answers with them.

A real ``mmcl-edge serve --teach`` process on a loopback port, a real learner process, real files;
the inbox survives ``kill -9``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mmcl-edge[serve]'")

from test_serve import DEADLINE_S, free_port, http, infer_body  # noqa: E402
from test_teach import NAMES, SPECS, day_folder  # noqa: E402

from mmcl_edge.data.synthetic import synthetic_arrays  # noqa: E402

TOKEN = "a-long-enough-teaching-token-0123"


@pytest.fixture(scope="module")
def arrays():
    return synthetic_arrays(n_classes=6, per_class=60, domains=1, seed=5)


def taught_workspace(tmp_path, arrays):
    from mmcl_edge.teaching import teach_folder

    ws = tmp_path / "ws"
    teach_folder(ws, day_folder(tmp_path / "day1", arrays, [0, 1, 2, 3], 0), overrides={"train.epochs": 3})
    (tmp_path / "token").write_text(TOKEN + "\n")
    return ws


class Served:
    def __init__(self, ws, token_file, port, *extra):
        self.url = f"http://127.0.0.1:{port}/v2/models/mmcl"
        cmd = [sys.executable, "-m", "mmcl_edge.cli.main", "serve", "-w", str(ws), "--port", str(port),
               "--provider", "cpu", "--poll", "0.1", "--teach", "--teach-token-file", str(token_file), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + DEADLINE_S
        while True:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                if http("GET", f"http://127.0.0.1:{port}/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < end, "serve --teach did not become ready"
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)


def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def samples_body(arrays, cls, n, label, start=0):
    idx = np.flatnonzero(arrays["y"] == cls)[start:start + n]
    body = infer_body({m: arrays[f"x_{m}"][idx].astype(np.float32) for m in SPECS})
    body["parameters"] = {"label": label}
    return body


def test_a_live_service_is_taught_a_new_class_and_answers_with_it(tmp_path, arrays):
    ws = taught_workspace(tmp_path, arrays)
    srv = Served(ws, tmp_path / "token", free_port())
    try:
        body = samples_body(arrays, 4, 5, "kick")
        assert http("POST", f"{srv.url}/samples", body, {"Content-Type": "application/json"})[0] == 401
        assert http("POST", f"{srv.url}/samples", body, auth("wrong-token-wrong-token"))[0] == 403
        assert http("POST", f"{srv.url}/learn", {}, {"Content-Type": "application/json"})[0] == 401
        status, err = http("POST", f"{srv.url}/samples", {**body, "parameters": {}}, auth())
        assert status == 400 and "label" in err["error"]
        for cls, name in ((4, "kick"), (5, "punch")):
            status, ack = http("POST", f"{srv.url}/samples", samples_body(arrays, cls, 5, name), auth())
            assert status == 200 and ack["accepted"] == 5, ack
        status, job = http("POST", f"{srv.url}/learn", {}, auth())
        assert status == 200 and job["state"] == "queued"
        end = time.monotonic() + DEADLINE_S
        while True:
            status, state = http("GET", f"{srv.url}/learn/{job['id']}", None, auth())
            assert status == 200 and state["id"] == job["id"]
            if state["state"] in ("published", "refused", "failed"):
                break
            assert time.monotonic() < end, state
            time.sleep(0.2)
        assert state["state"] == "published", state
        assert state["classes_added"] == ["kick", "punch"]
        assert http("GET", f"{srv.url}/learn/nosuchjob", None, auth())[0] == 404
        # the same server answers with the new class once the pack has swapped in (inference needs no token)
        test = {m: arrays[f"x_{m}"][np.flatnonzero(arrays["y"] == 4)[-10:]].astype(np.float32) for m in SPECS}
        end = time.monotonic() + DEADLINE_S
        while True:
            status, out = http("POST", f"{srv.url}/infer", infer_body(test))
            assert status == 200
            labels = next(o for o in out["outputs"] if o["name"] == "labels")["data"]
            if "kick" in labels:
                break
            assert time.monotonic() < end, labels
            time.sleep(0.2)
        assert np.mean([lbl == "kick" for lbl in labels]) >= 0.8
    finally:
        srv.stop()


def learner_pids(server_pid: int) -> set[int]:
    """The server's child processes that are teaching learners (from /proc: real processes)."""
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server_pid and "mmcl_edge.teaching" in cmdline:
            pids.add(int(entry))
    return pids


def learn_and_wait(srv, cls, name, arrays):
    assert http("POST", f"{srv.url}/samples", samples_body(arrays, cls, 5, name), auth())[0] == 200
    status, job = http("POST", f"{srv.url}/learn", {}, auth())
    assert status == 200
    end = time.monotonic() + DEADLINE_S
    while True:
        state = http("GET", f"{srv.url}/learn/{job['id']}", None, auth())[1]
        if state["state"] in ("published", "refused", "failed"):
            return state
        assert time.monotonic() < end, state
        time.sleep(0.1)


def test_a_warm_learner_waits_learns_each_job_and_ends_with_the_service(tmp_path, arrays):
    ws = taught_workspace(tmp_path, arrays)
    srv = Served(ws, tmp_path / "token", free_port(), "--teach-warm")
    try:
        end = time.monotonic() + DEADLINE_S
        while not learner_pids(srv.proc.pid):  # started with the service, before any job
            assert time.monotonic() < end, "no learner process was started by --teach-warm"
            time.sleep(0.1)
        (learner,) = learner_pids(srv.proc.pid)
        assert learn_and_wait(srv, 4, "kick", arrays)["state"] == "published"
        assert learn_and_wait(srv, 5, "punch", arrays)["state"] == "published"
        assert learner_pids(srv.proc.pid) == {learner}  # the same process, still waiting
    finally:
        srv.stop()
    end = time.monotonic() + DEADLINE_S
    while os.path.exists(f"/proc/{learner}") and open(f"/proc/{learner}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < end, "the warm learner outlived its service"
        time.sleep(0.1)


def test_acknowledged_samples_survive_kill_9(tmp_path, arrays):
    from mmcl_edge.runtime.inbox import Inbox

    ws = taught_workspace(tmp_path, arrays)
    srv = Served(ws, tmp_path / "token", free_port())
    acked = 0
    try:
        for i in range(12):
            status, ack = http("POST", f"{srv.url}/samples", samples_body(arrays, 4, 2, "kick", start=2 * i), auth())
            assert status == 200, ack
            acked += ack["accepted"]
    finally:
        srv.stop(signal.SIGKILL)
    assert Inbox(ws).usage()["samples"] == acked == 24
    srv = Served(ws, tmp_path / "token", free_port())  # a restarted service learns all of them
    try:
        status, job = http("POST", f"{srv.url}/learn", {}, auth())
        assert status == 200
        samples, labels = Inbox(ws).read_job(job["id"])
        assert len(labels) == 24 and all(len(v) == 24 for v in samples.values())
    finally:
        srv.stop()


def test_serve_teach_refuses_to_start_without_a_token(tmp_path, arrays):
    ws = taught_workspace(tmp_path, arrays)
    r = subprocess.run([sys.executable, "-m", "mmcl_edge.cli.main", "serve", "-w", str(ws), "--teach"],
                       capture_output=True, text=True, timeout=DEADLINE_S)
    assert r.returncode == 2 and "--teach-token-file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "short").write_text("abc")
    r = subprocess.run([sys.executable, "-m", "mmcl_edge.cli.main", "serve", "-w", str(ws), "--teach",
                        "--teach-token-file", str(tmp_path / "short")], capture_output=True, text=True, timeout=DEADLINE_S)
    assert r.returncode == 2 and "16 characters" in r.stderr
