"""Scale-out on Ray (the ``scale`` extra): replicas behind one route follow new packs; bench cl as Ray tasks.

Marked slow and skipped where Ray is not installed (CI does not install the scale extra).
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


def test_bench_cl_on_ray_gives_the_same_rows_as_local_workers(local_ray, tmp_path):
    from mmcl_edge.bench.cl import ScenarioSpec, run_cl_benchmark
    from mmcl_edge.config import LearnConfig

    spec = ScenarioSpec("synthetic-cil")
    config = LearnConfig().override({"train.epochs": 2})
    methods = ["mmcl", "ridge", "finetune"]
    local = run_cl_benchmark(spec, methods, 2, config, tmp_path / "cache", workers=2)
    on_ray = run_cl_benchmark(spec, methods, 2, config, tmp_path / "cache", ray=True)
    assert list(on_ray["methods"]) == methods and on_ray["scenario"] == local["scenario"]
    for name in methods:
        a, b = local["methods"][name], on_ray["methods"][name]
        for key in ("accuracy_matrix", "final_average_accuracy", "average_incremental_accuracy", "forgetting"):
            assert a[key] == b[key], (name, key)
        assert [s["accuracy_matrix"] for s in a["per_seed"]] == [s["accuracy_matrix"] for s in b["per_seed"]]


def test_ray_replicas_follow_a_leader_without_a_shared_folder(local_ray, synthetic_ws, tmp_path):
    """``serve --ray --follow``: each replica keeps its own verified copy (a folder of its own, on its
    node), fetched from the leader's URL; a new pack on the leader reaches every replica."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from test_serve import ServerThread

    from mmcl_edge.bench.fleet import republish
    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime import ray_serve
    from mmcl_edge.runtime.server import create_app
    from mmcl_edge.runtime.trust import new_keypair

    ws = tmp_path / "leader"
    shutil.copytree(synthetic_ws.root, ws)
    _, public = new_keypair(ws / "keys")
    republish(ws)  # signed v0003
    leader = Runtime(ws, providers="cpu", trusted_keys=[public])
    leader.start_watcher(0.1)
    sc = synthetic_ws.scenario()
    inputs = {m: np.stack(sc.test.samples[m][:4]).astype(np.float32) for m in sc.specs}
    with ServerThread(create_app(leader)) as server:
        port = free_port()
        ray_serve.run(str(tmp_path / "replicas"), port=port, replicas=2, providers="cpu", replica_cpus=0.5,
                      blocking=False, follow={"leader": server.url, "trusted_keys": [public.read_bytes()], "wait": 1.0})
        base = f"http://127.0.0.1:{port}"
        end = time.monotonic() + DEADLINE_S
        seen: dict[str, int] = {}
        while len(seen) < 2:
            version, replica, labels = infer(base, inputs)
            assert version == 3 and labels == leader.predict(inputs).labels
            seen[replica] = version
            assert time.monotonic() < end, f"only {len(seen)} replica(s) answered"
        republish(ws)
        while not all(v == 4 for v in seen.values()):
            version, replica, _ = infer(base, inputs)
            assert replica in seen and version >= seen[replica]  # never back
            seen[replica] = version
            assert time.monotonic() < end, f"not every replica reached v0004: {seen}"
        folders = sorted(p.name for p in (tmp_path / "replicas").iterdir())
        assert len(folders) == 2 and all(f.startswith("replica-") for f in folders)
        assert all((tmp_path / "replicas" / f / "current").read_text().strip() == "v0004" for f in folders)
        from ray import serve

        serve.delete("mmcl-edge")
    leader.stop()


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
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
end = time.time() + 240
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


def test_two_node_ray_cluster_on_namespaces_serves_followers_and_runs_bench_cl(synthetic_ws, tmp_path):
    """A Ray head and a Ray worker on two network hosts (namespaces joined by a veth pair): ``serve
    --ray --follow`` puts a replica on each node, each fetching its packs from the leader's URL; then
    ``bench cl --ray`` on the same cluster gives the local run's per-method, per-seed numbers. (The
    namespaces share this machine's file system: the tap cache is still read by path here.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mmcl_edge.bench.cl import ScenarioSpec, run_cl_benchmark
    from mmcl_edge.bench.fleet import Hosts, NamespaceError, republish
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.runtime.trust import new_keypair

    if ray.is_initialized():  # the module's local Ray is not this cluster
        from ray import serve

        serve.shutdown()
        ray.shutdown()
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
        url = f"http://{head_ip}:8100/v2/models/mmcl/infer"
        end = time.monotonic() + DEADLINE_S

        def replicas_at(version):
            seen = {}
            while len({r for r, v in seen.items() if v == version}) < 2:
                assert serving.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < end, (seen, (tmp_path / "serve.log").read_text()[-3000:])
                for v, replica in json.loads(in_ns(head, NS_INFER, url, 20, body)):
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
        local = run_cl_benchmark(ScenarioSpec("synthetic-cil"), ["mmcl", "ridge", "finetune"], 2,
                                 LearnConfig().override({"train.epochs": 2}), tmp_path / "cache-local", workers=1)
        for name in ("mmcl", "ridge", "finetune"):
            a, b = local["methods"][name], on_ray["methods"][name]
            assert [s["accuracy_matrix"] for s in a["per_seed"]] == [s["accuracy_matrix"] for s in b["per_seed"]], name
    finally:
        hosts.destroy()
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)
