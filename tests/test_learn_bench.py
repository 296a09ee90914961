"""``mmcl-edge bench learn``: cached taps vs back-propagating through the backbone, learning beside
serving, and the thread policy. Structure and consistency only: no timing assertions."""
from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from mmcl_edge.cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_bench_learn_writes_consistent_json(synthetic_ws, tmp_path):
    out = tmp_path / "bench-learn.json"
    r = invoke("bench", "learn", "-w", synthetic_ws.root, "--epochs", 2, "--max-samples", 40, "--out", out)
    assert r.exit_code == 0, r.output
    assert "(b)/(a)" in r.output and "full method" in r.output
    d = json.loads(out.read_text())
    for key in ("scenario", "task", "epochs", "batch_size", "samples", "task_train_samples", "subsampled",
                "max_samples", "thread_policy", "paths", "ratio_seconds", "ratio_peak_rss"):
        assert key in d, key
    assert d["epochs"] == 2 and d["samples"] == 40 and d["subsampled"] is True and d["max_samples"] == 40
    assert d["task_train_samples"] > 40
    p = d["paths"]
    assert set(p) == {"taps", "backprop", "full"}
    for name, e in p.items():
        assert e["seconds"] > 0 and e["peak_rss_mb"] > 0, name
        assert e["peak_rss_mb"] >= e["rss_before_mb"] - 1, name        # the peak is at least what was there
        assert sum(e["stages"].values()) <= e["seconds"] + 0.05, name   # stages add up to no more than the total
        assert e["threads"]["policy"] == "on"
    assert set(p["taps"]["stages"]) == {"extract_s", "train_s"}
    assert set(p["backprop"]["stages"]) == {"preprocess_s", "train_s"}
    assert set(p["full"]["stages"]) == {"extract_s", "learn_s"}
    assert p["full"]["learn_task_train_seconds"] <= p["full"]["stages"]["learn_s"] + 1e-6
    assert math.isclose(d["ratio_seconds"], p["backprop"]["seconds"] / p["taps"]["seconds"], rel_tol=1e-9)
    assert math.isclose(d["ratio_seconds_without_step_preprocessing"],
                        (p["backprop"]["seconds"] - p["backprop"]["stages"]["preprocess_s"]) / p["taps"]["seconds"],
                        rel_tol=1e-9)
    assert d["ratio_seconds_without_step_preprocessing"] <= d["ratio_seconds"]
    assert math.isclose(d["ratio_peak_rss"], p["backprop"]["peak_rss_mb"] / p["taps"]["peak_rss_mb"], rel_tol=1e-9)
    # the two plain-CE paths do the same computation (identity backbones here): the same loss, bit for bit
    assert p["taps"]["final_loss"] == p["backprop"]["final_loss"]
    assert p["taps"]["steps"] == p["backprop"]["steps"] == 2  # 40 samples, batch 64: one step per epoch


def test_bench_learn_while_serving_measures_both_sides(synthetic_ws, tmp_path):
    out = tmp_path / "ws.json"
    r = invoke("bench", "learn", "-w", synthetic_ws.root, "--while-serving", "--task", 1, "--epochs", 1,
               "--serve-seconds", 0.5, "--out", out)  # task 1: the full method continues from task 0's state
    assert r.exit_code == 0, r.output
    assert "serve p99 ms" in r.output and "learn s" in r.output
    d = json.loads(out.read_text())
    lr, sv = d["learn"], d["serve"]
    assert lr["quiet_s"] > 0 and lr["while_serving_s"] > 0
    assert math.isclose(lr["ratio"], lr["while_serving_s"] / lr["quiet_s"], rel_tol=1e-9)
    for w in ("quiet", "while_learning", "while_learner_process"):
        assert sv[w]["requests"] > 0, w
        assert 0 < sv[w]["p50_ms"] <= sv[w]["p99_ms"], w
    assert sv["while_learner_process"]["requests"] >= sv["while_learning"]["requests"]
    assert math.isclose(sv["p99_ratio"], sv["while_learning"]["p99_ms"] / sv["quiet"]["p99_ms"], rel_tol=1e-9)
    assert sv["peak_rss_mb"] > 0 and d["thread_policy"] == "on" and d["task"] == 1
    assert d["targets"] == {"learn_ratio_max": 2.0, "p99_ratio_max": 2.0}


def test_bench_learn_user_errors_are_one_line(synthetic_ws, tmp_path):
    for args in (("--task", 99), ("--thread-policy", "maybe"), ("--max-samples", 1)):
        r = invoke("bench", "learn", "-w", synthetic_ws.root, *args, "--out", tmp_path / "x.json")
        assert r.exit_code == 2, r.output
        assert "error:" in r.output and "Traceback" not in r.output
    r = invoke("bench", "learn", "-w", tmp_path / "nowhere", "--out", tmp_path / "x.json")
    assert r.exit_code == 2 and "not a workspace" in r.output
    assert not (tmp_path / "x.json").exists()


def test_thread_policy_defaults_and_off(monkeypatch):
    from mmcl_edge import threads

    for key in ("MMCL_EDGE_THREAD_POLICY", "MMCL_EDGE_LEARN_THREADS", "MMCL_EDGE_SERVE_THREADS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(threads, "cpu_count", lambda: 2)
    assert threads.learn_threads() == 1                  # the learner leaves half the cores to serving
    assert threads.serve_threads() == 0                  # the runtime: onnxruntime's default (spinning off)
    assert threads.learn_threads(3) == 3 and threads.serve_threads(4) == 4  # train.threads / threads= win
    monkeypatch.setattr(threads, "cpu_count", lambda: 6)
    assert threads.learn_threads() == 3
    monkeypatch.setattr(threads, "cpu_count", lambda: 64)
    assert threads.learn_threads() == threads.MAX_LEARN_THREADS
    monkeypatch.setattr(threads, "cpu_count", lambda: 1)
    assert threads.learn_threads() == 1
    monkeypatch.setenv("MMCL_EDGE_SERVE_THREADS", "2")
    assert threads.serve_threads() == 2
    monkeypatch.delenv("MMCL_EDGE_SERVE_THREADS")
    monkeypatch.setenv("MMCL_EDGE_LEARN_THREADS", "2")
    assert threads.learn_threads() == 2
    monkeypatch.delenv("MMCL_EDGE_LEARN_THREADS")
    on = threads.child_env(True)
    assert on.get("OMP_WAIT_POLICY") and "MMCL_EDGE_THREAD_POLICY" not in on
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("MMCL_EDGE_THREAD_ENV_SET", raising=False)
    assert "OMP_WAIT_POLICY" not in threads.child_env(False)                # the policy's own variable goes
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")                         # a user's own is kept
    assert threads.child_env(False)["OMP_WAIT_POLICY"] == "ACTIVE"
    assert threads.child_env(True)["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.setenv("MMCL_EDGE_THREAD_POLICY", "off")
    assert threads.learn_threads() == 0                                     # library defaults
