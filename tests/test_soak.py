"""``mmcl-edge bench soak``: threads predict while the learner re-learns the last task and packs swap in."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np

from mmcl_edge.runtime import layout
from mmcl_edge.bench.soak import _BINS, _bin, check_answer, hist_percentile

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
KEYS = ("minutes", "threads", "requests", "failures", "swaps", "rejected_packs", "packs_published", "p50_ms",
        "p99_ms", "rss_start_mb", "rss_warm_mb", "rss_end_mb", "rss_growth_after_warmup_pct",
        "learner_exit_code", "errors")
# the CLI with Python's own Ctrl-C handler, even where the test runs with SIGINT ignored (a background job)
CLI_WITH_SIGINT = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "from mmcl_edge.cli.main import app; sys.argv = ['mmcl-edge', *sys.argv[1:]]; app()")


def test_histogram_percentiles_and_answer_check():
    hist = [0] * _BINS
    for ms in np.linspace(1.0, 100.0, 1000):
        hist[_bin(float(ms))] += 1
    assert abs(hist_percentile(hist, 0.5) - 50.5) / 50.5 < 0.02
    assert abs(hist_percentile(hist, 0.99) - 99.0) / 99.0 < 0.02
    assert hist_percentile([0] * _BINS, 0.5) is None
    good = SimpleNamespace(labels=["b"], indices=np.array([1]), scores=np.array([0.7]),
                           probabilities=np.array([[0.3, 0.7]]), pack_version=3)
    assert check_answer(good, 1, ["a", "b"]) is None
    assert "not among" in check_answer(SimpleNamespace(**{**vars(good), "labels": ["z"]}), 1, ["a", "b"])
    assert check_answer(good, 1, ["a", "b", "c"]) is not None  # probabilities of another pack's classes
    assert check_answer(good, 1, None) is not None


def test_bench_soak_serves_while_packs_swap(synthetic_ws, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, root)  # the soak publishes packs: never into the shared fixture
    before = layout.pack_versions(synthetic_ws.root)
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "-m", "mmcl_edge.cli.main", "bench", "soak", "-w", str(root),
                           "--minutes", "0.25", "--threads", "2", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert [k for k in KEYS if k not in r] == []
    assert r["requests"] > 0 and r["failures"] == 0, r["errors"]
    assert r["packs_published"] >= 1 and r["swaps"] >= 1, r["learner_output_tail"]
    assert r["rejected_packs"] == 0 and r["learner_exit_code"] == 0, r
    assert r["rss_start_mb"] > 0 and r["rss_warm_mb"] > 0 and r["rss_end_mb"] > 0
    assert r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"]
    assert r["server_torch_loaded"] is False  # the serving process is the torch-free runtime
    assert "requests" in proc.stderr  # progress lines
    assert layout.pack_versions(synthetic_ws.root) == before


def test_bench_soak_ctrl_c_stops_learner_and_writes_json(synthetic_ws, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, root)
    out = tmp_path / "soak.json"
    proc = subprocess.Popen([sys.executable, "-c", CLI_WITH_SIGINT, "bench", "soak", "-w", str(root), "--minutes",
                             "5", "--threads", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in proc.stderr:  # the first progress line: the clients are serving
            if "requests" in line:
                break
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    r = json.loads(out.read_text())
    assert r["interrupted"] is True and r["requests"] > 0 and r["failures"] == 0, r
    assert r["seconds"] < 120
    assert r["learner_exit_code"] is not None  # the soak waited for its learner child to end
    with layout.workspace_lock(root, "test"):  # the learner child is gone: nobody holds the workspace
        pass
