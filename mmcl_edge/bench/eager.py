"""The PyTorch-eager reference for ``mmcl-edge bench latency``: the same stages (numpy
preprocessing, the PyTorch backbones, the learner's model) on the same test samples.

It runs in a child process with PyTorch's own threading (``mmcl_edge.threads`` policy off): the
thread policy's passive OpenMP waits suit a learner that shares the cores, but they make eager
inference wait on every operator, so measuring eager under them would flatter the runtime.

    python -m mmcl_edge.bench.eager '{"root": ..., "batches": [1, 8], "repeats": 50, "threads": 0}'
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(root: Path, batches: list[int], repeats: int, threads: int = 0) -> dict:
    """``{str(batch): {stage: percentiles}}``, or ``{"skipped": why}``."""
    import torch

    from mmcl_edge.errors import WorkspaceError
    from mmcl_edge.preprocess import preprocess_batch
    from mmcl_edge.runtime.latency import batch_of, percentiles, workspace_test_samples
    from mmcl_edge.runtime.layout import read_current
    from mmcl_edge.workspace import Workspace

    if threads:
        torch.set_num_threads(threads)
    samples, why = workspace_test_samples(root)
    if samples is None:
        return {"skipped": f"the workspace's test data cannot be loaded ({why})"}
    ws = Workspace.open(root)
    sc, src = ws.scenario(), ws.tap_source()
    manifest = json.loads((Path(root) / "packs" / read_current(Path(root)) / "manifest.json").read_text())
    try:
        model = ws.load_model(manifest["task"]).eval()
    except WorkspaceError as exc:  # a deployed copy: packs and backbones, no learner state
        return {"skipped": str(exc)}
    out = {"torch_threads": torch.get_num_threads()}
    for b in batches:
        inputs = batch_of(samples, b)
        ms: dict[str, list[float]] = {"preprocess": [], "backbone": [], "pack": [], "total": []}
        with torch.inference_mode():
            for i in range(repeats + 5):
                t0 = time.perf_counter()
                pre = {m: torch.from_numpy(preprocess_batch(inputs[m], sc.specs[m])) for m in sc.specs}
                t1 = time.perf_counter()
                taps = {m: list(src.backbones[m](x)) for m, x in pre.items()}
                t2 = time.perf_counter()
                model(taps)
                t3 = time.perf_counter()
                if i >= 5:
                    for k, v in (("preprocess", t1 - t0), ("backbone", t2 - t1), ("pack", t3 - t2), ("total", t3 - t0)):
                        ms[k].append(1e3 * v)
        out[str(b)] = {k: percentiles(v) for k, v in ms.items()}
    return out


def measure_in_child(root: Path, batches: list[int], repeats: int, threads: int = 0) -> dict:
    """``measure`` in a fresh process with PyTorch's default threading."""
    from mmcl_edge.threads import child_env

    args = json.dumps({"root": str(root), "batches": list(batches), "repeats": repeats, "threads": threads})
    # cwd: a neutral folder, so a source checkout's mmcl_edge/ in the caller's cwd cannot shadow the package
    proc = subprocess.run([sys.executable, "-m", "mmcl_edge.bench.eager", args], capture_output=True, text=True,
                          env=child_env(policy=False), timeout=3600, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        return {"skipped": f"the eager run failed: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    print(json.dumps(measure(Path(a["root"]), a["batches"], a["repeats"], a["threads"])))
