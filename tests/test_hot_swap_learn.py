"""A runtime already serving a workspace picks up the pack of a task learned by another process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np

from mmcl_edge.runtime import Runtime


def learn_task(ws, k, fsdd_dir):
    env = {**os.environ, "MMCL_EDGE_DATA": str(fsdd_dir)}
    cmd = [sys.executable, "-m", "mmcl_edge.cli.main", "learn", "--scenario", "avdigits-cil", "-w", str(ws),
           "--task", str(k), "--epochs", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_running_runtime_serves_new_classes_after_learn_task(avdigits_ws, fsdd_dir, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(avdigits_ws.root / "taps", ws / "taps")  # the device already has these taps cached
    out = learn_task(ws, 0, fsdd_dir)
    # the main command prints the accuracy matrix and the summary
    assert "Accuracy (%) after each task" in out and "final avg acc" in out
    sc = avdigits_ws.scenario()
    old_classes = [sc.class_names[c] for c in sc.tasks[0].classes]
    new_classes = [sc.class_names[c] for c in sc.tasks[1].classes]
    with Runtime(ws, providers="cpu") as rt:
        rt.start_watcher(poll_seconds=0.2)
        assert rt.pack.label_names == old_classes
        idx = sc.tasks[1].test_idx[:20]
        inputs = {m: [sc.test.samples[m][i] for i in idx] for m in sc.specs}
        before = rt.predict(inputs)
        assert set(before.labels) <= set(old_classes)  # it cannot know the new digits yet
        learn_task(ws, 1, fsdd_dir)  # a separate process, as on a device
        deadline = time.monotonic() + 60
        while rt.pack.manifest["task"] != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rt.pack.manifest["task"] == 1, f"still serving task {rt.pack.manifest['task']}: {rt.rejections}"
        after = rt.predict(inputs)
        assert after.pack_version != before.pack_version
        truth = [sc.class_names[sc.test.y[i]] for i in idx]
        assert set(truth) <= set(new_classes)
        assert np.mean(np.array(after.labels) == np.array(truth)) >= 0.8
        assert not rt.rejections
