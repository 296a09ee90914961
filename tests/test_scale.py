"""Scale-out on Ray (the ``scale`` extra): replicas behind one route follow new packs in a shared folder.

``bench cl --ray`` against the local run, and replicas that follow a leader, are tested on a real
two-node cluster in tests/test_ray_nodes.py. Marked slow; skipped where Ray is not installed (CI installs it).
"""
from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request

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
