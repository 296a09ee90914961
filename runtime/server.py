"""An HTTP inference endpoint speaking the Open Inference Protocol (KServe v2, what Triton serves).

    app = create_app(Runtime("ws"), model_name="mmcl")     # FastAPI; run it with uvicorn
    mmcl-edge serve -w ws --port 8000                     # the same from the command line

Torch-free (FastAPI + uvicorn + prometheus-client: the ``serve`` extra). Routes:

    GET  /v2/health/live, /v2/health/ready, /v2                  server liveness, readiness, metadata
    GET  /v2/models/{name}, /v2/models/{name}/ready               model metadata and readiness
    POST /v2/models/{name}/infer                                  inference (JSON, or JSON + binary tensors)
    GET  /metrics                                                 Prometheus text format
    GET  /v2/models/{name}/packs[/{version}], .../backbones[/{file}], .../fleet   read-only, for followers
                                                                  (``fleet_routes.py``)

Inputs: one tensor per modality, named after it, datatype FP32 (a text modality: BYTES [B], UTF-8
strings), the first axis the batch. A request
may leave a modality out; the runtime decides whether that is allowed. Outputs (all by default, or
the ones named in ``outputs``): ``labels`` BYTES [B], ``scores`` FP32 [B] (probability of the
label), ``class_index`` INT64 [B] (index into the pack's labels), ``probabilities`` FP32 [B, C],
``pack_version`` INT64 [1] and ``timings_ms`` FP32 [4] (preprocess, backbone, pack, total; the names
are in the output's ``parameters.stages``). Every answer names the pack that produced it:
``model_version``, ``parameters.pack_version`` and the ``x-mmcl-pack-version`` header (and the
process that answered: ``x-mmcl-replica``, host:pid). An input tensor may be left out when a sensor
dropped out; ``parameters.modalities`` lists the modalities that answered. The binary tensor extension (what
``tritonclient.http`` sends by default) is understood in both directions.

User mistakes (unknown model, a missing/unknown tensor, wrong datatype, shape and data that do not
agree, malformed JSON) are answered with the protocol's ``{"error": "..."}`` and a 4xx status.

Limits (``ServerLimits``; ``mmcl-edge serve`` flags): a body over ``max_body_bytes`` (as sent, and
again after gzip/deflate decompression) is answered 413 before more of it is read or inflated; a
body that pauses longer than ``body_timeout`` gets 408; request line and headers must arrive within
``header_timeout`` and fit ``max_header_bytes``; idle connections close after ``keep_alive``; more
than ``max_concurrency`` connections or requests in flight get 503. Bodies are decoded off the event
loop (a thread), so one large request does not stall the others. Any unexpected failure is a JSON
500, counted in ``/metrics`` like every other answer.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmcl_edge import __version__
from mmcl_edge.runtime.errors import RuntimeUserError
from mmcl_edge.runtime.service import SAMPLE_NDIM, Runtime

HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor extension's header
STAGES = ("preprocess", "backbone", "pack", "total")
OUTPUTS = ("labels", "scores", "class_index", "probabilities", "pack_version", "timings_ms", "novelty", "unknown")
NOVELTY_OUTPUTS = ("novelty", "unknown")  # answered by packs that score novelty (since 0.4)
# datatype -> numpy dtype (the protocol's fixed-size types); inputs must be FP32, see model metadata
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}
INPUT_DATATYPE = "FP32"
TEXT_DATATYPE = "BYTES"
REPLICA = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (several behind one route on Ray)
log = logging.getLogger("mmcl_edge.server")


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one client can make the server hold or wait for (README "Trust and safety")."""

    max_body_bytes: int = 64 << 20     # request body, as sent and after decompression (Triton's default)
    body_timeout: float = 30.0         # longest pause (s) while a request body arrives: then 408
    header_timeout: float = 10.0       # request line and headers must arrive within this (s)
    max_header_bytes: int = 16 << 10   # request line and headers together
    keep_alive: float = 5.0            # an idle connection is closed after this (s)
    max_concurrency: int = 64          # connections or requests in flight; beyond it new requests get 503


class ProtocolError(Exception):
    """A request the protocol answers with ``{"error": message}`` and ``status``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def input_shape(runtime: Runtime, modality: str) -> list[int]:
    """The declared tensor shape of one modality: -1 for the batch axis and every free axis."""
    spec = runtime.backbones.specs[modality]
    if spec.kind == "text":  # one string per sample
        return [-1]
    if spec.kind == "vector":  # the identity backbone: its input is the sample
        return [-1, *runtime.backbones.index[modality]["input_shape"]]
    return [-1] + [-1] * SAMPLE_NDIM.get(spec.kind, 1)


def input_datatype(runtime: Runtime, modality: str) -> str:
    """FP32 tensors, except a text modality: a BYTES tensor [B] of UTF-8 strings."""
    return TEXT_DATATYPE if runtime.backbones.specs[modality].kind == "text" else INPUT_DATATYPE


def model_metadata(runtime: Runtime, model_name: str) -> dict:
    pack = runtime.pack
    n = len(pack.label_names)
    return {
        "name": model_name,
        "versions": [str(pack.version)],
        "platform": "mmcl-edge",
        "inputs": [{"name": m, "datatype": input_datatype(runtime, m), "shape": input_shape(runtime, m),
                    "parameters": {"kind": runtime.backbones.specs[m].kind}} for m in runtime.backbones.modalities],
        "outputs": [{"name": "labels", "datatype": "BYTES", "shape": [-1]},
                    {"name": "scores", "datatype": "FP32", "shape": [-1]},
                    {"name": "class_index", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, n]},
                    {"name": "pack_version", "datatype": "INT64", "shape": [1]},
                    {"name": "timings_ms", "datatype": "FP32", "shape": [len(STAGES)],
                     "parameters": {"stages": ",".join(STAGES)}}]
                   + ([{"name": "novelty", "datatype": "FP32", "shape": [-1],
                        "parameters": {"threshold": pack.novelty_threshold}},
                       {"name": "unknown", "datatype": "BOOL", "shape": [-1]}]
                      if pack.novelty_threshold is not None else []),
        "parameters": {"pack_version": pack.version, "task": pack.manifest["task"], "labels": pack.label_names,
                       "image_inputs": "[B, H, W] or [B, H, W, C]"},
    }


# request decoding ---------------------------------------------------------------------------------
def _inflate(body: bytes | bytearray, encoding: str, cap: int) -> bytearray:
    """Decompress in 1 MiB steps, stopping as soon as the output passes ``cap``: a small body that
    inflates past the cap (a gzip bomb) never holds more than ``cap`` bytes of its output."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    out, data = bytearray(), body
    try:
        while data and not d.eof:
            out += d.decompress(data, 1 << 20)
            if len(out) > cap:
                raise ProtocolError(f"the request body inflates to more than {cap} bytes (the limit; "
                                    "--max-body-mb raises it)", 413)
            data = d.unconsumed_tail
    except zlib.error as exc:
        raise ProtocolError(f"the request body is not valid {encoding} ({exc})") from None
    if not d.eof:
        raise ProtocolError(f"the request body is not valid {encoding} (the stream is truncated)")
    return out


def _split_body(body: bytes | bytearray, headers, limits: ServerLimits) -> tuple[dict, bytes | memoryview]:
    encoding = (headers.get("content-encoding") or "").lower()
    if encoding in ("gzip", "deflate"):
        body = _inflate(body, encoding, limits.max_body_bytes)
    elif encoding not in ("", "identity"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or none", 415)
    length = headers.get(HEADER_LENGTH.lower())
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {length[:40]!r}") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes")
        view = memoryview(body)  # the tensors stay where they are: no copy of a large binary part
        header, binary = bytes(view[:n]), view[n:]
    else:
        header, binary = body, b""
    try:
        request = json.loads(header)
    except RecursionError:
        raise ProtocolError("the request JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer with too many digits
        raise ProtocolError(f"the request is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object with 'inputs'")
    return request, binary


def _flatten(data, depth: int) -> list:
    """Row-major flattening of JSON data nested at most ``depth`` lists deep (the protocol allows flat
    or nested data); level by level, so deep nesting costs no recursion."""
    level = data if isinstance(data, list) else [data]
    for _ in range(depth - 1):  # the outer list is the first axis
        if not any(isinstance(d, list) for d in level):
            return level
        flat: list = []
        for d in level:
            if isinstance(d, list):
                flat.extend(d)
            else:
                flat.append(d)
        level = flat
    if any(isinstance(d, list) for d in level):
        raise ValueError(f"nested deeper than its shape's {depth} axes")
    return level


def _decode_text(name: str, t: dict, shape: list[int], count: int, size, binary: bytes,
                 offset: int) -> tuple[np.ndarray, int]:
    """A BYTES input -> a unicode array of ``shape``: JSON strings, or the binary layout (each element
    a 4-byte little-endian length, then its UTF-8 bytes). Invalid UTF-8 is replaced, never refused."""
    if len(shape) != 1:
        raise ProtocolError(f"input {name!r}: a text input has shape [B] (one string per sample), got {shape}")
    if size is not None:
        if "data" in t:
            raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size")
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} does not fit the bytes sent")
        blob, values, pos = binary[offset:offset + size], [], 0
        while pos < len(blob):
            if pos + 4 > len(blob):
                raise ProtocolError(f"input {name!r}: a BYTES element's 4-byte length is cut off")
            n = struct.unpack_from("<I", blob, pos)[0]
            if pos + 4 + n > len(blob):
                raise ProtocolError(f"input {name!r}: a BYTES element claims {n} bytes beyond binary_data_size")
            values.append(bytes(blob[pos + 4:pos + 4 + n]).decode("utf-8", errors="replace"))
            pos += 4 + n
        offset += size
    else:
        if "data" not in t:
            raise ProtocolError(f"input {name!r} has no 'data'")
        try:
            values = _flatten(t["data"], len(shape))
        except ValueError as exc:
            raise ProtocolError(f"input {name!r}: 'data' is {exc}") from None
        if not all(isinstance(v, str) for v in values):
            raise ProtocolError(f"input {name!r}: 'data' must hold strings for datatype BYTES")
    if len(values) != count:
        raise ProtocolError(f"input {name!r}: shape {shape} needs {count} strings, got {len(values)}")
    return np.array(values, dtype=str) if values else np.array([], dtype="<U1"), offset


def decode_inputs(request: dict, binary: bytes | memoryview, runtime: Runtime, max_bytes: int = ServerLimits.max_body_bytes
                  ) -> dict[str, np.ndarray]:
    """The request's named tensors as arrays, checked against the model's declared inputs; a shape
    that holds more values than ``max_bytes`` of body could carry is refused before any allocation."""
    tensors = request.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise ProtocolError("the request needs 'inputs': a non-empty list of tensors")
    known = runtime.backbones.modalities
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for t in tensors:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ProtocolError("every input needs a 'name'")
        name = t["name"]
        if name not in known:
            raise ProtocolError(f"unknown input {name!r}; this model's inputs are {known}")
        if name in arrays:
            raise ProtocolError(f"input {name!r} is given twice")
        shape, datatype = t.get("shape"), t.get("datatype")
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ProtocolError(f"input {name!r}: 'shape' must be a non-empty list of non-negative integers, "
                                f"the first the batch size; got {shape!r}")
        wanted = input_datatype(runtime, name)
        if datatype != wanted:
            raise ProtocolError(f"input {name!r}: datatype {datatype!r} is not accepted; this input is {wanted}")
        count = math.prod(shape)  # Python integers: a product past int64 cannot wrap around
        if count * 4 > max_bytes:  # binary FP32 (or a BYTES element's 4-byte length) is the densest encoding
            raise ProtocolError(f"input {name!r}: shape {shape[:8]} holds {count} values, more than a request of "
                                f"at most {max_bytes} bytes can carry")
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if wanted == TEXT_DATATYPE:
            arr, offset = _decode_text(name, t, shape, count, size, binary, offset)
        elif size is not None:
            if "data" in t:
                raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size")
            itemsize = np.dtype(DTYPES[datatype]).itemsize
            if not isinstance(size, int) or size != count * itemsize or offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size!r} does not match shape {shape} "
                                    f"of {datatype} ({count * itemsize} bytes) or the bytes sent")
            arr = np.frombuffer(binary, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<"), count=count,
                                offset=offset).astype(np.float32).reshape(shape)
            offset += size
        else:
            if "data" not in t:
                raise ProtocolError(f"input {name!r} has no 'data'")
            try:
                flat = _flatten(t["data"], len(shape))
            except ValueError as exc:
                raise ProtocolError(f"input {name!r}: 'data' is {exc}") from None
            if len(flat) != count:
                raise ProtocolError(f"input {name!r}: shape {shape} needs {count} values, 'data' holds {len(flat)}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
                raise ProtocolError(f"input {name!r}: 'data' must hold numbers for datatype {datatype}")
            try:
                arr = np.asarray(flat, dtype=np.float32).reshape(shape)
            except OverflowError:  # an integer beyond any float
                raise ProtocolError(f"input {name!r}: 'data' holds a number beyond the range of {datatype}") from None
        declared = input_shape(runtime, name)
        image = runtime.backbones.specs[name].kind == "image"
        if runtime.backbones.specs[name].kind in SAMPLE_NDIM:  # kinds this server knows; others: the runtime decides
            ok_ndim = arr.ndim == len(declared) or (image and arr.ndim == len(declared) + 1)
            fixed_ok = all(d == -1 or d == s for d, s in zip(declared, arr.shape))
            if not ok_ndim or not fixed_ok:
                raise ProtocolError(f"input {name!r}: shape {list(arr.shape)} does not fit the declared "
                                    f"{declared} (-1: any size)")
        if arr.shape[0] == 0:
            raise ProtocolError(f"input {name!r}: the batch is empty")
        arrays[name] = arr
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return arrays


def decode_request(body: bytes | bytearray, headers, runtime: Runtime, limits: ServerLimits) -> tuple[dict, dict[str, np.ndarray]]:
    """A whole request body -> (the JSON request, its tensors), every cap applied: decompression,
    JSON and conversion. Blocking work: ``read_request`` runs it in a thread."""
    request, binary = _split_body(body, headers, limits)
    return request, decode_inputs(request, binary, runtime, limits.max_body_bytes)


async def read_body(request: Request, limits: ServerLimits) -> bytearray:
    """The body, refused with 413 as soon as it is known to pass ``max_body_bytes`` (its
    Content-Length, or the bytes counted so far of a chunked one), and with 408 when it pauses
    longer than ``body_timeout``. A bytearray: decoding reads it in place, never a second copy."""
    cap = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ProtocolError(f"the request body is {int(declared)} bytes; the limit is {cap} (--max-body-mb "
                            "raises it)", 413)
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), limits.body_timeout)
        except asyncio.TimeoutError:
            raise ProtocolError(f"the request body paused for more than {limits.body_timeout:g} s", 408) from None
        if message["type"] != "http.request":  # the client went away
            raise ProtocolError("the client disconnected before the request body was complete", 400)
        body += message.get("body", b"")
        if len(body) > cap:
            raise ProtocolError(f"the request body is more than {cap} bytes, the limit (--max-body-mb raises it)",
                                413)
        if not message.get("more_body", False):
            return body


async def read_request(request: Request, runtime: Runtime, limits: ServerLimits) -> tuple[dict, dict[str, np.ndarray]]:
    """The one way a route takes tensors (infer, and any later route that takes the same tensors):
    the body under the size cap and timeout, then decoded off the event loop."""
    body = await read_body(request, limits)
    return await run_in_threadpool(decode_request, body, request.headers, runtime, limits)


def requested_outputs(request: dict) -> list[tuple[str, bool]]:
    """(name, binary) for each requested output; all outputs (as JSON, unless asked) when none are named."""
    params = request.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    wanted = request.get("outputs")
    if wanted is None:
        return [(n, default_binary) for n in OUTPUTS]
    if not isinstance(wanted, list):
        raise ProtocolError("'outputs' must be a list of {\"name\": ...}")
    chosen = []
    for o in wanted:
        if not isinstance(o, dict) or o.get("name") not in OUTPUTS:
            got = o.get("name") if isinstance(o, dict) else o
            raise ProtocolError(f"unknown output {got!r}; this model's outputs are {list(OUTPUTS)}")
        p = o.get("parameters") or {}
        chosen.append((o["name"], bool(p.get("binary_data", default_binary)) if isinstance(p, dict) else default_binary))
    return chosen


# The infer request in the app's OpenAPI schema (app.openapi(); the fuzz test generates requests from it).
_ERROR = {"description": "a mistake in the request, or a limit passed: {\"error\": \"...\"}",
          "content": {"application/json": {"schema": {"type": "object", "required": ["error"],
                                                          "properties": {"error": {"type": "string"}}}}}}
INFER_OPENAPI = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "items": {
                "type": "object", "required": ["name", "shape", "datatype", "data"],
                "properties": {"name": {"type": "string"},
                               "shape": {"type": "array", "items": {"type": "integer"}},
                               "datatype": {"type": "string"},
                               "parameters": {"type": "object",
                                              "properties": {"binary_data_size": {"type": "integer"}}},
                               "data": {"type": "array", "items": {}}}}},
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}}}}}}},
    "responses": {"200": {"description": "the outputs (KServe v2 inference response)",
                          "content": {"application/json": {"schema": {"type": "object"}}}},
                  **{code: _ERROR for code in ("400", "404", "408", "413", "415", "431")}},
}


# response encoding --------------------------------------------------------------------------------
def _bytes_tensor(values: list[str]) -> bytes:
    """The protocol's binary BYTES layout: each element a 4-byte little-endian length, then its bytes."""
    out = bytearray()
    for v in values:
        b = v.encode("utf-8")
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


def encode_response(pred, model_name: str, request_id, outputs: list[tuple[str, bool]]) -> tuple[bytes, int | None]:
    """JSON body (plus binary tensors after it when asked) and the JSON header's length if binary."""
    values = {
        "labels": ("BYTES", [len(pred.labels)], list(pred.labels)),
        "scores": ("FP32", [len(pred.labels)], np.asarray(pred.scores, dtype=np.float32)),
        "class_index": ("INT64", [len(pred.labels)], np.asarray(pred.indices, dtype=np.int64)),
        "probabilities": ("FP32", list(pred.probabilities.shape), np.asarray(pred.probabilities, dtype=np.float32)),
        "pack_version": ("INT64", [1], np.asarray([pred.pack_version], dtype=np.int64)),
        "timings_ms": ("FP32", [len(STAGES)], np.asarray([pred.timings_ms.get(s, float("nan")) for s in STAGES],
                                                          dtype=np.float32)),
    }
    if pred.novelty is not None:
        values["novelty"] = ("FP32", [len(pred.labels)], np.asarray(pred.novelty, dtype=np.float32))
        values["unknown"] = ("BOOL", [len(pred.labels)], np.asarray(pred.unknown, dtype=np.bool_))
    tensors, blobs = [], []
    for name, binary in outputs:
        if name not in values:  # novelty of a pack that does not score it: nothing to answer
            continue
        datatype, shape, data = values[name]
        t = {"name": name, "datatype": datatype, "shape": shape}
        if name == "timings_ms":
            t["parameters"] = {"stages": ",".join(STAGES)}
        if binary:
            blob = _bytes_tensor(data) if datatype == "BYTES" else np.ascontiguousarray(data).astype(
                np.asarray(data).dtype.newbyteorder("<")).tobytes()
            t.setdefault("parameters", {})["binary_data_size"] = len(blob)
            blobs.append(blob)
        else:
            t["data"] = data if datatype == "BYTES" else np.asarray(data).ravel().tolist()
        tensors.append(t)
    body = {"model_name": model_name, "model_version": str(pred.pack_version),
            "parameters": {"pack_version": pred.pack_version, "modalities": ",".join(pred.modalities)},
            "outputs": tensors}
    if request_id is not None:
        body["id"] = request_id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


# metrics ------------------------------------------------------------------------------------------
class _RuntimeCollector:
    """Pack state read from the runtime at scrape time: version, swaps, rejected packs."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def collect(self):
        yield GaugeMetricFamily("mmcl_pack_version", "Version of the pack serving now",
                                value=self.runtime.pack.version)
        yield CounterMetricFamily("mmcl_pack_swaps", "Packs swapped in since the server started (after the first)",
                                  value=getattr(self.runtime, "swaps", 0))
        yield CounterMetricFamily("mmcl_pack_rejections", "Packs that failed validation and never served",
                                  value=len(self.runtime.rejections))


class Metrics:
    def __init__(self, runtime: Runtime):
        self.registry = CollectorRegistry()
        self.requests = Counter("mmcl_requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=self.registry)
        self.latency = Histogram("mmcl_infer_latency_seconds", "Inference request latency (seconds, successful)",
                                 registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.registry.register(_RuntimeCollector(runtime))

    def text(self) -> bytes:
        return generate_latest(self.registry)


# the app ------------------------------------------------------------------------------------------
def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(runtime: Runtime, model_name: str = "mmcl", teach=None, limits: ServerLimits | None = None) -> FastAPI:
    """A FastAPI app serving ``runtime`` as model ``model_name`` (the caller starts any watcher);
    ``teach`` (``teach_routes.TeachSettings``) adds the token-guarded teaching routes; ``limits``
    bound every request (the teaching routes take tensors through the same ``read_request``)."""
    limits = limits or ServerLimits()
    app = FastAPI(title="mmcl-edge", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(runtime)
    app.state.runtime, app.state.metrics, app.state.model_name = runtime, metrics, model_name
    app.state.limits = limits

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        scope = request.scope
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(k) + len(v) + 4 for k, v in scope["headers"])
        try:
            if head > limits.max_header_bytes:  # h11 bounds what it buffers; this bounds what it accepted
                response = _error(f"the request line and headers take {head} bytes; the limit is "
                                  f"{limits.max_header_bytes} (--max-header-kb raises it)", 431)
            else:
                response = await call_next(request)
        except Exception:  # a bug: answered in JSON and counted, its traceback in the server's log
            log.exception("unexpected error answering %s %s", request.method, request.url.path)
            response = _error("internal server error (the server's log has the details)", 500)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "name", None) or "unknown", str(response.status_code)).inc()
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(str(exc.detail), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(f"invalid request: {exc.errors()}", 400)

    def check_model(name: str) -> None:
        if name != model_name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {model_name!r}", 404)

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError):
        return _error(str(exc), exc.status)

    @app.get("/v2/health/live", name="live")
    def live():
        return {"live": True}

    @app.get("/v2/health/ready", name="ready")
    def ready():
        ok = runtime.pack is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2", name="server_metadata")
    def server_metadata():
        return {"name": "mmcl-edge", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}", name="model_metadata")
    def metadata(name: str):
        check_model(name)
        return model_metadata(runtime, model_name)

    @app.get("/v2/models/{name}/ready", name="model_ready")
    def model_ready(name: str):
        check_model(name)
        ok = runtime.pack is not None
        return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/models/{name}/infer", name="infer", openapi_extra=INFER_OPENAPI)
    async def infer(name: str, request: Request):
        start = time.perf_counter()
        check_model(name)
        req, arrays = await read_request(request, runtime, limits)
        outputs = requested_outputs(req)
        try:  # a batch per modality, as a list of samples: the first axis is always the batch
            pred = await run_in_threadpool(runtime.predict, {m: list(a) for m, a in arrays.items()})
        except RuntimeUserError as exc:  # InputError: the runtime says what does not fit
            raise ProtocolError(str(exc)) from None
        body, header_length = encode_response(pred, model_name, req.get("id"), outputs)
        metrics.latency.observe(time.perf_counter() - start)
        headers = {"x-mmcl-pack-version": str(pred.pack_version), "x-mmcl-replica": REPLICA}
        if header_length is None:
            return Response(body, media_type="application/json", headers=headers)
        headers[HEADER_LENGTH] = str(header_length)
        return Response(body, media_type="application/octet-stream", headers=headers)

    @app.get("/metrics", name="metrics")
    def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    if teach is not None:
        from mmcl_edge.runtime.teach_routes import add_teach_routes

        async def read(request: Request):  # the same caps, timeout and thread as infer
            return await read_request(request, runtime, limits)

        app.state.learner = add_teach_routes(app, runtime, runtime.root, teach, read, check_model, _error)
    from mmcl_edge.runtime.fleet_routes import add_fleet_routes

    app.state.fleet = add_fleet_routes(app, runtime, check_model, _error)  # packs, read-only, for followers
    return app


# the HTTP server -----------------------------------------------------------------------------------
def _protocol(header_timeout: float):
    """uvicorn's h11 protocol with a deadline for request line and headers (uvicorn has none: a
    client trickling its headers would hold the connection forever) and JSON for malformed requests."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # bytes of a new request: its head has a deadline
                self._arm_head_timer()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self._head_timer is not None:
                self._head_timer.cancel()  # the head arrived
                self._head_timer = None

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": f"{msg.rstrip('.')}: malformed, or its line and headers pass the size "
                                        "limit"}).encode()
            for event in (h11.Response(status_code=400, headers=[(b"content-type", b"application/json"),
                                                                 (b"content-length", str(len(body)).encode()),
                                                                 (b"connection", b"close")]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return Protocol


def uvicorn_config(app, limits: ServerLimits | None = None, **kwargs):
    """The uvicorn configuration that enforces ``limits`` at the connection level (h11 protocol,
    header size and deadline, keep-alive, concurrency); ``kwargs`` go to ``uvicorn.Config``."""
    import uvicorn

    limits = limits or getattr(app.state, "limits", None) or ServerLimits()
    return uvicorn.Config(app, http=_protocol(limits.header_timeout), h11_max_incomplete_event_size=limits.max_header_bytes,
                          timeout_keep_alive=limits.keep_alive, limit_concurrency=limits.max_concurrency,
                          **{"log_level": "warning", **kwargs})
