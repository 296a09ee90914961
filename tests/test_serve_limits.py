"""Issue #16: what one bad or hostile request may cost the endpoint (a real uvicorn on 127.0.0.1).

Request size and decompression caps (413), the body and header deadlines, malformed bodies that
must be 4xx JSON (never a plain-text 500), 500s counted in /metrics, decoding off the event loop,
and a bounded fuzz run: schemathesis on the app's own OpenAPI schema, hypothesis on the decoder.
"""
from __future__ import annotations

import gzip
import json
import shutil
import socket
import threading
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mmcl-edge[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'mmcl-edge[serve]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_serve import DEADLINE_S, ServerThread, http, infer_body, test_inputs  # noqa: E402

from mmcl_edge.runtime import Runtime  # noqa: E402
from mmcl_edge.runtime import server  # noqa: E402
from mmcl_edge.runtime.server import ServerLimits, create_app  # noqa: E402

CAP = 1 << 20  # a 1 MiB body cap keeps these tests small; the default is 64 MiB
LIMITS = ServerLimits(max_body_bytes=CAP, body_timeout=1.0, header_timeout=1.0)
INFER = "/v2/models/mmcl/infer"


@pytest.fixture(scope="module")
def limited(synthetic_ws, tmp_path_factory):
    ws = tmp_path_factory.mktemp("limits") / "ws"
    shutil.copytree(synthetic_ws.root, ws)
    rt = Runtime(ws, providers="cpu")
    app = create_app(rt, "mmcl", limits=LIMITS)
    with ServerThread(app) as srv:
        srv.runtime, srv.app = rt, app
        yield srv
    rt.stop()


def raw_exchange(port: int, head: bytes, body_chunks=(), pause: float = 0.0) -> bytes:
    """Send ``head`` then ``body_chunks`` (in another thread, stopping at the first refusal) and
    read the answer until the server closes or answers; a reset after the answer is fine."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    answer = bytearray()
    done = threading.Event()

    def send():
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                if done.is_set():
                    return
                sock.sendall(chunk)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
            if b"\r\n\r\n" in answer:
                head_end = answer.index(b"\r\n\r\n") + 4
                length = [int(line.split(b":")[1]) for line in answer[:head_end].split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(answer) >= head_end + length[0]:
                    break
    except ConnectionResetError:
        pass
    finally:
        done.set()
        sock.close()
        sender.join(timeout=DEADLINE_S)
    return bytes(answer)


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), answer[:200]
    return int(head.split()[1]), json.loads(body)


def test_gzip_bomb_is_refused_with_413_and_never_fully_inflated(limited):
    """Old code: zlib.decompress without a cap (1 GB held); here 64x the cap from a ~70 KB body."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(comp.compress(zeros) for _ in range(64)) + comp.flush()
    assert len(bomb) < CAP // 8
    status, body = http("POST", limited.url + INFER, bomb, {"Content-Encoding": "gzip",
                                                             "Content-Type": "application/json"})
    assert status == 413 and "inflates to more than" in body["error"], (status, body)
    # inflating exactly the cap is allowed (and then judged as JSON), one byte more is not
    assert server._inflate(gzip.compress(b"x" * CAP), "gzip", CAP) == b"x" * CAP
    with pytest.raises(server.ProtocolError) as exc:
        server._inflate(gzip.compress(b"x" * (CAP + 1)), "gzip", CAP)
    assert exc.value.status == 413
    status, body = http("POST", limited.url + INFER, gzip.compress(b"x" * 100)[:-9], {"Content-Encoding": "gzip"})
    assert status == 400 and "gzip" in body["error"]


def test_oversized_body_is_413_before_it_is_read(limited):
    """Old code read any body whole: a declared 200 MB body is refused from its Content-Length alone,
    a chunked one as soon as the bytes counted pass the cap."""
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {200 << 20}\r\n\r\n").encode()
    status, body = status_and_json(raw_exchange(limited.port, head, [b"{" * 1000]))  # the rest never comes
    assert status == 413 and str(CAP) in body["error"]
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    chunk = b"%x\r\n%s\r\n" % (64 << 10, b" " * (64 << 10))
    status, body = status_and_json(raw_exchange(limited.port, head, [chunk] * (4 * CAP // (64 << 10))))
    assert status == 413 and "limit" in body["error"]
    # a body at the cap is read and judged on its content
    status, body = http("POST", limited.url + INFER, b" " * (CAP - 2) + b"{}")
    assert status == 400 and "inputs" in body["error"]


def test_a_stalled_body_gets_408_and_a_trickled_head_is_cut_off(limited, synthetic_ws):
    """Old code: no deadline for the head (300 trickling connections stayed open) and none for the body."""
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode()
    status, body = status_and_json(raw_exchange(limited.port, head, [b"{"]))  # 99 bytes never come
    assert status == 408 and "paused" in body["error"]
    # a head trickled a byte at a time: the connection is closed at the header deadline, unanswered
    start = time.monotonic()
    answer = raw_exchange(limited.port, b"", [b"GET /v2/health/live HTTP/1.1\r\n"] + [b"X"] * 400, pause=0.05)
    assert answer == b"" and time.monotonic() - start < DEADLINE_S
    # a connection that sends nothing is closed too
    with socket.create_connection(("127.0.0.1", limited.port), timeout=DEADLINE_S) as s:
        assert s.recv(10) == b""
    # the server still answers
    status, _ = http("POST", limited.url + INFER, infer_body(test_inputs(synthetic_ws, 1)))
    assert status == 200


def test_oversized_headers_get_a_json_400(limited):
    """Old code (httptools, picked by uvicorn when installed): 200 KB of headers accepted."""
    status, body = http("GET", limited.url + "/v2/health/live", headers={"X-Big": "a" * (200 << 10)})
    assert status == 400 and "headers" in body["error"], (status, body)  # h11 stops buffering at the limit
    status, body = http("GET", limited.url + "/v2/health/live", headers={"X-Big": "a" * (20 << 10)})
    assert status == 431 and "headers" in body["error"], (status, body)  # arrived whole, then refused
    assert http("GET", limited.url + "/v2/health/live", headers={"X-Small": "a" * 1000})[0] == 200


def test_malformed_bodies_are_4xx_json_never_500(limited, synthetic_ws):
    """Old code: plain-text 500s for an int64-overflowing shape, a 400-digit integer, deep nesting."""
    good = infer_body(test_inputs(synthetic_ws, 1))
    m0, m1 = good["inputs"]
    deep = 5000
    cases = {
        "shape overflows int64": {"inputs": [{**m0, "shape": [4294967296, 4294967296]}, m1]},
        "shape past the body cap": {"inputs": [{**m0, "shape": [1 << 20, 12]}, m1]},
        "400-digit integer": json.dumps({"inputs": [{**m0, "data": [0] * 11 + ["BIG"]}, m1]}).replace(
            '"BIG"', "9" * 400).encode(),
        "5000-digit integer": json.dumps({"inputs": [{**m0, "data": [0] * 11 + ["BIG"]}, m1]}).replace(
            '"BIG"', "9" * 5000).encode(),
        "data nested deeper than the shape": {"inputs": [{**m0, "data": [[[v] for v in m0["data"]]]}, m1]},
        "data nested 5000 deep": json.dumps({"inputs": [{**m0, "data": "DEEP"}, m1]}).replace(
            '"DEEP"', "[" * deep + "1" + "]" * deep).encode(),
        "JSON nested 5000 deep": b'{"inputs": ' + b"[" * deep + b"]" * deep + b"}",
        "binary size past the body": {"inputs": [{**m0, "parameters": {"binary_data_size": 48}}, m1]},
        "header length of 5000 digits": (json.dumps(good).encode(), {server.HEADER_LENGTH: "9" * 5000}),
    }
    for what, body in cases.items():
        body, headers = body if isinstance(body, tuple) else (body, None)
        status, answer = http("POST", limited.url + INFER, body, headers)
        assert 400 <= status < 500, (what, status, answer)
        assert isinstance(answer, dict) and answer.get("error"), (what, answer)


def test_unexpected_errors_are_json_500s_counted_in_metrics(limited, synthetic_ws, monkeypatch):
    def broken(inputs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(limited.runtime, "predict", broken)
    status, body = http("POST", limited.url + INFER, infer_body(test_inputs(synthetic_ws, 1)))
    assert status == 500 and body == {"error": "internal server error (the server's log has the details)"}
    monkeypatch.undo()
    _, text = http("GET", limited.url + "/metrics")
    assert 'mmcl_requests_total{code="500",route="infer"} 1.0' in text, text
    assert http("POST", limited.url + INFER, infer_body(test_inputs(synthetic_ws, 1)))[0] == 200


def test_bodies_are_decoded_off_the_event_loop(limited, synthetic_ws, monkeypatch):
    """Old code parsed and converted on the event loop: one 200 MB body stalled every client."""
    seen = []
    decode = server.decode_inputs

    def spy(*args, **kwargs):
        seen.append(threading.get_ident())
        return decode(*args, **kwargs)

    monkeypatch.setattr(server, "decode_inputs", spy)
    assert http("POST", limited.url + INFER, infer_body(test_inputs(synthetic_ws, 1)))[0] == 200
    assert seen and seen[0] != limited.thread.ident  # not the thread that runs the event loop


def test_the_teaching_route_takes_tensors_under_the_same_limits(synthetic_ws, tmp_path):
    """POST .../samples decodes through the same read_request: its caps and errors are infer's."""
    from mmcl_edge.runtime.teach_routes import TeachSettings

    ws = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, ws)
    rt = Runtime(ws, providers="cpu")
    token = "a-long-enough-teaching-token-0123"
    app = create_app(rt, "mmcl", teach=TeachSettings(token, 1 << 20, 100), limits=LIMITS)
    auth = {"Authorization": f"Bearer {token}"}
    samples = "/v2/models/mmcl/samples"
    good = infer_body(test_inputs(synthetic_ws, 1), parameters={"label": "3"})
    m0, m1 = good["inputs"]
    with ServerThread(app) as srv:
        head = (f"POST {samples} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Length: {200 << 20}\r\n\r\n").encode()
        status, body = status_and_json(raw_exchange(srv.port, head, [b"{"]))
        assert status == 413 and str(CAP) in body["error"]
        comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        bomb = b"".join(comp.compress(bytes(1 << 20)) for _ in range(8)) + comp.flush()
        status, body = http("POST", srv.url + samples, bomb, {**auth, "Content-Encoding": "gzip"})
        assert status == 413 and "inflates" in body["error"]
        deep = json.dumps({**good, "inputs": [{**m0, "data": "DEEP"}, m1]}).replace(
            '"DEEP"', "[" * 5000 + "1" + "]" * 5000).encode()
        status, body = http("POST", srv.url + samples, deep, auth)
        assert status == 400 and body["error"]
        status, body = http("POST", srv.url + samples, {**good, "inputs": [{**m0, "shape": [1 << 32, 1 << 32]}, m1]},
                            auth)
        assert status == 400 and "more than a request" in body["error"]
        status, _ = http("POST", srv.url + samples, good, auth)
        assert status == 200
    rt.stop()


def test_serve_flags_set_the_limits(synthetic_ws):
    """`mmcl-edge serve --max-body-mb ... --max-header-kb ...` reach the app and the HTTP layer."""
    import subprocess
    import sys

    from test_serve import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmcl_edge.cli.main", "serve", "-w", str(synthetic_ws.root),
                             "--port", str(port), "--provider", "cpu", "--max-body-mb", "0.01", "--max-header-kb", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + DEADLINE_S
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if http("GET", url + "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < end, "mmcl-edge serve did not become ready"
            time.sleep(0.1)
        status, body = http("POST", url + INFER, b" " * 20000)
        assert status == 413 and "the limit is 10485" in body["error"], (status, body)
        status, body = http("GET", url + "/v2/health/live", headers={"X-Big": "a" * 3000})
        assert status == 431 and "--max-header-kb" in body["error"], (status, body)
        assert http("POST", url + INFER, infer_body(test_inputs(synthetic_ws, 1)))[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# fuzzing ------------------------------------------------------------------------------------------
FUZZ_EXAMPLES = 150  # bounded: the CI run takes seconds


def test_schemathesis_fuzz_of_the_openapi_schema_finds_no_500(limited):
    """Every operation of the app's own OpenAPI schema, valid and invalid requests alike: no 5xx,
    every error is JSON with an "error" string."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(limited.app.openapi())
    operations = [r.ok() for r in schema.get_all_operations()]
    assert any(op.path.endswith("/infer") for op in operations)
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                          for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    seen: dict[int, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        r = case.call(base_url=limited.url, timeout=DEADLINE_S)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.as_curl_command(base_url=limited.url), r.status_code, r.text[:300])
        if r.status_code >= 400:
            ctype = {k.lower(): v for k, v in r.headers.items()}.get("content-type", [""])
            assert (ctype[0] if isinstance(ctype, list) else ctype).startswith("application/json"), r.text[:300]
            assert isinstance(r.json().get("error"), str), r.text[:300]

    check()
    assert sum(seen.values()) >= FUZZ_EXAMPLES // 2 and any(400 <= c < 500 for c in seen), seen


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=4),
                           max_leaves=30)
tensor = st.fixed_dictionaries({"name": st.sampled_from(["m0", "m1", "m9"]) | st.text(max_size=4),
                                "datatype": st.sampled_from(["FP32", "INT32", "BYTES"]) | json_values,
                                "shape": st.lists(st.integers(-2, 1 << 40) | st.sampled_from([1, 12, 10]),
                                                  max_size=4) | json_values,
                                "data": st.lists(st.floats(width=32) | st.integers() | json_values, max_size=40)
                                | json_values},
                               optional={"parameters": st.fixed_dictionaries(
                                   {}, optional={"binary_data_size": st.integers(-4, 200) | json_values})})
requests = st.fixed_dictionaries({}, optional={"inputs": st.lists(tensor, max_size=3) | json_values,
                                                "outputs": json_values, "parameters": json_values,
                                                "id": json_values})


@settings(max_examples=300, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=requests | json_values, binary=st.binary(max_size=64), gz=st.booleans())
def test_decoder_answers_any_body_with_tensors_or_a_protocol_error(synthetic_ws, request, binary, gz):
    """The request decoder, on arbitrary JSON (+ binary tail, + gzip): it returns arrays that fit the
    model's inputs, or raises ProtocolError with a 4xx status; nothing else escapes."""
    rt = _runtime(synthetic_ws)
    header = json.dumps(request).encode()
    headers = {server.HEADER_LENGTH.lower(): str(len(header))} if binary else {}
    body = header + binary
    if gz:
        body, headers = gzip.compress(body), {**headers, "content-encoding": "gzip"}
    try:
        req, arrays = server.decode_request(body, headers, rt, ServerLimits(max_body_bytes=4096))
    except server.ProtocolError as exc:
        assert 400 <= exc.status < 500 and str(exc)
        return
    assert isinstance(req, dict) and arrays
    for name, a in arrays.items():
        assert name in ("m0", "m1") and a.dtype == np.float32 and a.ndim == 2 and a.shape[0] >= 1


_RUNTIMES: dict = {}


def _runtime(ws) -> Runtime:
    if ws.root not in _RUNTIMES:
        _RUNTIMES[ws.root] = Runtime(ws.root, providers="cpu")
    return _RUNTIMES[ws.root]
