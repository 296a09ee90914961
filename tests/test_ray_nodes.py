"""Ray on two network hosts of this machine (issue #20): a head and a worker in two network namespaces
joined by a veth pair. Slow; skipped where Ray is not installed or namespaces cannot be made (root)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'mmcl-edge[scale]'")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'mmcl-edge[scale]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mmcl-edge[serve]'")
pytest.importorskip("cryptography", reason="signed packs need the sign extra: pip install 'mmcl-edge[sign]'")

pytestmark = pytest.mark.slow
DEADLINE_S = 300  # an upper bound on waiting (Ray starts processes), never a timing assertion


NS_INFER = r"""
import json, sys, time, urllib.request
url, n, body = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
seen = []
for _ in range(n):
    try:
        req = urllib.request.Request(url, data=body, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            seen.append([json.load(r)["parameters"]["pack_version"], r.headers["x-mmcl-replica"]])
    except OSError as exc:
        seen.append([None, str(exc)])
        time.sleep(0.5)
print(json.dumps(seen))
"""

NS_CLUSTER = r"""
import socket, sys, time, ray
end = time.time() + 240
host, port = sys.argv[1].split(":")
while True:  # the head may still be starting: wait for its port (a failed ray.init cannot be retried)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        break
    except OSError:
        assert time.time() < end, "the Ray head did not start"
        time.sleep(1)
time.sleep(3)
ray.init(address=sys.argv[1], log_to_driver=False)
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.time() < end, ray.nodes()
    time.sleep(1)
print(sum(n["Alive"] for n in ray.nodes()))
"""

NS_BENCH = r"""
import json, sys
from pathlib import Path
from mmcl_edge.bench.cl import ScenarioSpec, run_cl_benchmark
from mmcl_edge.config import LearnConfig
out = run_cl_benchmark(ScenarioSpec("synthetic-cil"), ["mmcl", "ridge", "finetune"], 2,
                       LearnConfig().override({"train.epochs": 2}), Path(sys.argv[2]), ray=True, ray_address=sys.argv[1])
Path(sys.argv[3]).write_text(json.dumps(out))
"""


def test_two_node_ray_cluster_on_namespaces_serves_followers_and_runs_bench_cl(synthetic_ws, tmp_path, monkeypatch):
    """A Ray head and a Ray worker on two network hosts (namespaces joined by a veth pair): ``serve
    --ray --follow`` puts a replica on each node, each fetching its packs from the leader's URL; then
    ``bench cl --ray`` on the same cluster, its tap cache shipped to the nodes through Ray's object
    store, gives the local run's per-method, per-seed numbers."""
    from mmcl_edge.bench.cl import ScenarioSpec, run_cl_benchmark
    from mmcl_edge.bench.fleet import Hosts, NamespaceError, republish
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.runtime.trust import new_keypair

    # the cluster lives on namespaces of this machine only; no token (Ray would pick one up from ~/.ray)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    hosts = Hosts(followers=1, subnet=232)
    try:
        hosts.create()
    except NamespaceError as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc}")
    head, worker = hosts.leader, hosts.followers[0]
    head_ip, worker_ip = hosts.leader_ip(0), hosts.follower_ip(0)
    ray_bin = str(Path(sys.executable).parent / "ray")
    temps = [Path(f"/tmp/rh{os.getpid()}"), Path(f"/tmp/rw{os.getpid()}")]
    py = [sys.executable, "-m", "mmcl_edge.cli.main"]

    def in_ns(ns, code, *args, timeout=300):
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, *map(str, args)],
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    try:
        ws = tmp_path / "leader"
        shutil.copytree(synthetic_ws.root, ws)
        _, public = new_keypair(ws / "keys")
        republish(ws)  # signed v0003
        hosts.popen(head, py + ["serve", "-w", ws, "--host", "0.0.0.0", "--port", "8000", "--poll", "0.1",
                                "--threads", "1", "--trusted-key", public], tmp_path / "leader.log")
        common = ["--num-cpus", "1", "--block", "--disable-usage-stats"]
        hosts.popen(head, [ray_bin, "start", "--head", "--node-ip-address", head_ip, "--port", "6379",
                           "--include-dashboard", "false", "--temp-dir", temps[0], *common], tmp_path / "ray-head.log")
        hosts.popen(worker, [ray_bin, "start", "--address", f"{head_ip}:6379", "--node-ip-address", worker_ip,
                             "--temp-dir", temps[1], *common], tmp_path / "ray-worker.log")
        assert in_ns(head, NS_CLUSTER, f"{head_ip}:6379").strip() == "2"
        serving = hosts.popen(head, py + ["serve", "-w", tmp_path / "replicas", "--ray", "--ray-address",
                                          f"{head_ip}:6379", "--replicas", "2", "--replica-cpus", "1", "--host",
                                          "0.0.0.0", "--port", "8100", "--follow", f"http://{head_ip}:8000",
                                          "--trusted-key", public, "--follow-wait", "1"], tmp_path / "serve.log")
        sc = synthetic_ws.scenario()
        body = json.dumps({"inputs": [{"name": m, "shape": [1, len(sc.test.samples[m][0])], "datatype": "FP32",
                                       "data": np.asarray(sc.test.samples[m][0], np.float32).tolist()}
                                      for m in sc.specs], "outputs": [{"name": "labels"}]})
        end = time.monotonic() + DEADLINE_S

        def replicas_at(version):
            """Ask each node's Serve proxy from its own host (a proxy prefers its node's replica)."""
            seen = {}
            while len({r for r, v in seen.items() if v == version}) < 2:
                assert serving.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < end, (seen, (tmp_path / "serve.log").read_text()[-3000:])
                for ns, ip in ((head, head_ip), (worker, worker_ip)):
                    for v, replica in json.loads(in_ns(ns, NS_INFER, f"http://{ip}:8100/v2/models/mmcl/infer", 10, body)):
                        if v is not None:
                            assert v >= seen.get(replica, -1)  # never back
                            seen[replica] = v
                time.sleep(0.2)
            return {r for r, v in seen.items() if v == version}

        first = replicas_at(3)
        worker_pids = set(subprocess.run(["ip", "netns", "pids", worker], capture_output=True, text=True).stdout.split())
        assert any(r.rsplit(":", 1)[1] in worker_pids for r in first), (first, "no replica on the worker node")
        republish(ws)
        replicas_at(4)
        folders = sorted((tmp_path / "replicas").iterdir())
        assert len(folders) >= 2 and all((f / "current").read_text().strip() == "v0004" for f in folders)
        serving.terminate()
        serving.wait(120)
        # bench cl --ray on the two nodes: the same numbers as the local run
        in_ns(head, NS_BENCH, f"{head_ip}:6379", tmp_path / "cache", tmp_path / "ray.json", timeout=900)
        on_ray = json.loads((tmp_path / "ray.json").read_text())
        assert on_ray["tap_cache_shipped"]["bytes"] > 0  # the taps travelled with the jobs
        shutil.rmtree(Path(tempfile.gettempdir()) / f"mmcl-tap-cache-{on_ray['tap_cache_shipped']['sha256'][:16]}")
        local = run_cl_benchmark(ScenarioSpec("synthetic-cil"), ["mmcl", "ridge", "finetune"], 2,
                                 LearnConfig().override({"train.epochs": 2}), tmp_path / "cache-local", workers=1)
        for name in ("mmcl", "ridge", "finetune"):
            a, b = local["methods"][name], on_ray["methods"][name]
            assert [s["accuracy_matrix"] for s in a["per_seed"]] == [s["accuracy_matrix"] for s in b["per_seed"]], name
    finally:
        hosts.destroy()
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)
