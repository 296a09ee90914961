"""Scale-out on Ray (the ``scale`` extra): replicas behind one route follow new packs; bench cl as Ray tasks.

Marked slow and skipped where Ray is not installed (CI does not install the scale extra).
"""
from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'mmcl-edge[scale]'")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'mmcl-edge[scale]'")

pytestmark = pytest.mark.slow
DEADLINE_S = 300  # an upper bound on waiting (Ray starts processes), never a timing assertion


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infer(base: str, inputs: dict) -> tuple[int, str, list]:
    body = {"inputs": [{"name": m, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
                       for m, x in inputs.items()], "outputs": [{"name": "labels"}]}
    req = urllib.request.Request(f"{base}/v2/models/mmcl/infer", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.load(r)
        return answer["parameters"]["pack_version"], r.headers["x-mmcl-replica"], answer["outputs"][0]["data"]


def test_two_ray_serve_replicas_each_pick_up_a_new_pack(local_ray, synthetic_ws, tmp_path):
    from mmcl_edge.export.pack_export import set_current
    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime import ray_serve

    ws = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, ws)
    set_current(ws, "v0000")
    sc = synthetic_ws.scenario()
    inputs = {m: np.stack(sc.test.samples[m][:4]).astype(np.float32) for m in sc.specs}
    expected = {v: Runtime(ws, providers="cpu", pack=f"v{v:04d}").predict(inputs).labels for v in (0, 2)}
    port = free_port()
    ray_serve.run(str(ws), port=port, replicas=2, providers="cpu", poll_seconds=0.1, replica_cpus=0.5,
                  blocking=False)
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + DEADLINE_S
    seen: dict[str, list[int]] = {}
    while len(seen) < 2:  # both replicas answer behind the one route
        version, replica, labels = infer(base, inputs)
        assert version == 0 and labels == expected[0]
        seen.setdefault(replica, []).append(version)
        assert time.monotonic() < end, f"only {len(seen)} replica(s) answered"
    set_current(ws, "v0002")
    after: dict[str, list[int]] = {r: [] for r in seen}
    while not all(v and v[-1] == 2 for v in after.values()):
        version, replica, labels = infer(base, inputs)
        assert replica in after, "a third replica appeared"
        assert labels == expected[version]
        after[replica].append(version)
        assert time.monotonic() < end, f"not every replica reached v0002: {after}"
    for versions in after.values():
        assert versions == sorted(versions)  # a replica never goes back to the old pack


def test_bench_cl_on_ray_gives_the_same_rows_as_local_workers(local_ray, tmp_path):
    from mmcl_edge.bench.cl import ScenarioSpec, run_cl_benchmark
    from mmcl_edge.config import LearnConfig

    spec = ScenarioSpec("synthetic-cil")
    config = LearnConfig().override({"train.epochs": 2})
    methods = ["mmcl", "ridge", "finetune"]
    local = run_cl_benchmark(spec, methods, 2, config, tmp_path / "cache", workers=2)
    on_ray = run_cl_benchmark(spec, methods, 2, config, tmp_path / "cache", ray=True)
    import tempfile

    shutil.rmtree(Path(tempfile.gettempdir()) / f"mmcl-tap-cache-{on_ray['tap_cache_shipped']['sha256'][:16]}")
    assert list(on_ray["methods"]) == methods and on_ray["scenario"] == local["scenario"]
    for name in methods:
        a, b = local["methods"][name], on_ray["methods"][name]
        for key in ("accuracy_matrix", "final_average_accuracy", "average_incremental_accuracy", "forgetting"):
            assert a[key] == b[key], (name, key)
        assert [s["accuracy_matrix"] for s in a["per_seed"]] == [s["accuracy_matrix"] for s in b["per_seed"]]
