"""What a pack's ONNX graph may contain, checked before onnxruntime ever sees it (torch-free, no
``onnx`` package: a minimal reader of the protobuf wire format, enough for ModelProto's nodes,
tensors and subgraphs).

A pack is the part of the model that changes on the device, so its graph is held to the operators
the exporter really emits for the MMEncoder + head (``ALLOWED_OPS``, collected from exported packs
with ``onnx``) plus a few plain element-wise/shape operators. Control flow (``Loop``, ``Scan``,
``If``), custom domains, local functions, subgraphs and tensors stored as external data (a file
outside the hashed pack) are refused.
"""
from __future__ import annotations

from pathlib import Path

from mmcl_edge.errors import PackRejected

# Every op in packs exported today or before (opset 18; traced or dynamo exporter; analytic and linear heads) ...
EMITTED_OPS = {"Add", "Clip", "Concat", "Div", "Erf", "Expand", "Gather", "Gemm", "LayerNormalization", "Less",
               "MatMul", "Mul", "ReduceL2", "ReduceMean", "ReduceSum", "Reshape", "ScatterElements", "Shape",
               "Slice", "Softmax", "TopK", "Unsqueeze", "Where"}
# ... and plain element-wise / shape operators a small change of the exporter or the model may add
# (masks of absent modalities, casts). Nothing that loops, branches, or builds data-sized tensors.
EXTRA_OPS = {"Sub", "Neg", "Abs", "Sqrt", "Pow", "Exp", "Log", "Tanh", "Sigmoid", "Relu", "Reciprocal", "Max", "Min",
             "LogSoftmax", "Squeeze", "Transpose", "Flatten", "Split", "Identity", "Constant", "ConstantOfShape",
             "Cast", "Equal", "Greater", "Not", "And", "Or", "ReduceMax", "ReduceMin", "ArgMax",
             "GatherElements", "Sign"}
ALLOWED_OPS = frozenset(EMITTED_OPS | EXTRA_OPS)

MAX_GRAPH_BYTES = 64 << 20  # a pack graph is about a megabyte; 64 MB is far beyond any honest one
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: memoryview) -> list[tuple[int, int, object]]:
    """(field number, wire type, int or memoryview) for every field of one message. A list, and
    one-byte keys and lengths read inline: a third less time than a generator calling ``_varint``
    for each (an AV-Digits pack: 0.57 vs 0.85 ms, paid at every swap)."""
    out = []
    i, end = 0, len(buf)
    while i < end:
        if buf[i] < 0x80:
            key, i = buf[i], i + 1
        else:
            key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            if i < end and buf[i] < 0x80:
                n, i = buf[i], i + 1
            else:
                n, i = _varint(buf, i)
            if i + n > end:
                raise _Malformed("length beyond the end of the message")
            value, i = buf[i:i + n], i + n
        elif wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        if i > end:
            raise _Malformed("truncated field")
        out.append((field, wire, value))
    return out


def _text(value) -> str:
    return bytes(value).decode("utf-8", errors="replace")


def _check_tensor(buf, where: str, problems: list[str]) -> None:
    for field, wire, value in _fields(buf):
        if (field == 14 and wire == 0 and value == _EXTERNAL) or (field == 13 and wire == 2):
            problems.append(f"{where} stores a tensor as external data (a file outside the pack)")
            return


def _check_graph(buf, problems: list[str], ops: set[str], depth: int = 0) -> None:
    for field, wire, value in _fields(buf):
        if wire != 2:
            continue
        if field == 1:  # NodeProto
            op, domain = "", ""
            for f, w, v in _fields(value):
                if f == 4 and w == 2:
                    op = _text(v)
                elif f == 7 and w == 2:
                    domain = _text(v)
                elif f == 5 and w == 2:  # AttributeProto
                    for af, aw, av in _fields(v):
                        if af in (6, 11) and aw == 2:
                            problems.append(f"operator {op or '?'} carries a subgraph")
                        elif af in (5, 10) and aw == 2:
                            _check_tensor(av, f"operator {op or '?'}", problems)
            ops.add(op if domain in ("", "ai.onnx") else f"{domain}::{op}")
        elif field == 5:  # initializer
            _check_tensor(value, "an initializer", problems)
        elif field == 15:  # sparse initializer: values (1) and indices (2)
            for f, w, v in _fields(value):
                if f in (1, 2) and w == 2:
                    _check_tensor(v, "a sparse initializer", problems)


def check_graph_bytes(data: bytes, allowed=ALLOWED_OPS) -> set[str]:
    """The set of operators in a serialised ModelProto; raises ``PackRejected`` naming what is refused."""
    if len(data) > MAX_GRAPH_BYTES:
        raise PackRejected(f"the graph is {len(data) >> 20} MB; packs are limited to {MAX_GRAPH_BYTES >> 20} MB")
    problems: list[str] = []
    ops: set[str] = set()
    graphs = 0
    try:
        for field, wire, value in _fields(memoryview(data)):
            if field == 7 and wire == 2:
                graphs += 1
                _check_graph(value, problems, ops)
            elif field == 25 and wire == 2:
                problems.append("it defines local functions")
            elif field == 8 and wire == 2:
                for f, w, v in _fields(value):
                    if f == 1 and w == 2 and _text(v) not in ("", "ai.onnx"):
                        problems.append(f"it imports the operator domain {_text(v)!r}")
    except _Malformed as exc:
        raise PackRejected(f"the graph is not a well-formed ONNX model ({exc})") from None
    if graphs != 1:
        raise PackRejected("the graph is not a well-formed ONNX model (no graph)")
    if allowed is None:  # no allow-list (experiments): only external data and custom domains stay refused
        problems = [p for p in problems if "subgraph" not in p]
    else:
        refused = sorted(op for op in ops if op not in allowed)
        if refused:
            problems.append(f"it uses operators outside the pack allow-list: {', '.join(refused)}")
    if problems:
        raise PackRejected("the graph is refused: " + "; ".join(dict.fromkeys(problems)))
    return ops


def check_graph_file(path: Path, allowed=ALLOWED_OPS) -> bytes:
    """Read, check and return the bytes of ``path`` (the session is built from these very bytes)."""
    data = Path(path).read_bytes()
    check_graph_bytes(data, allowed)
    return data
