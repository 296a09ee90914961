"""Shared ONNX export plumbing: a dynamic batch axis, checking, hashing, atomic writes, and the
graph builder that packs and written backbones share (``GraphWriter``).

Backbones only, exported once per workspace with the dynamo exporter (it handles adaptive pooling
with a dynamic batch), except those ``export/written_backbones.py`` writes from their weights
(``save_onnx``). Packs are not exported by PyTorch: ``export/pack_graph.py`` writes them."""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from mmcl_edge.runtime.pack import sha256_file

OPSET = 18


class GraphWriter:
    """A graph written operator by operator: unique operator names, nodes in order, initializers kept
    as ``(name, array)`` (a name given again is the same constant, written once). ``save_onnx``
    streams them into a file; ``tensors()`` makes them protobuf for a model held in memory."""

    def __init__(self):
        self.nodes, self.initializers, self._n, self._names = [], [], 0, set()

    def const(self, value, name: str, dtype=np.float32) -> str:
        if name not in self._names:
            self._names.add(name)
            self.initializers.append((name, np.asarray(value, dtype=dtype, order="C")))  # 0-d stays 0-d
        return name

    def ints(self, values, name: str) -> str:
        return self.const(np.asarray(values, np.int64), name, np.int64)

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        """A node; ``outputs``: how many (named after the node) or their names. Returns its output(s)."""
        self._n += 1
        names = outputs if isinstance(outputs, list) else [f"{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        self.nodes.append(onnx.helper.make_node(op_type, inputs, names, name=f"{op_type}_{self._n}", **attrs))
        return names[0] if len(names) == 1 else names

    def tensors(self) -> list[onnx.TensorProto]:
        return [onnx.numpy_helper.from_array(a, name) for name, a in self.initializers]


def export_onnx(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path,
                input_names: list[str], output_names: list[str], free_axes: dict[int, int] | None = None) -> str:
    """Export ``module`` with every input's first axis dynamic ("batch"); returns the file's sha256.
    ``free_axes`` {axis: largest size} makes more axes of the (first) input dynamic, e.g. a text's length.

    Uses the dynamo exporter (the TorchScript one cannot export adaptive pooling with a dynamic
    batch), keeps the whole model in one file, runs ``onnx.checker`` and writes atomically.
    """
    tmp = _temporary(path)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = tuple({0: batch} for _ in example)
    for axis, largest in (free_axes or {}).items():
        dynamic[0][axis] = torch.export.Dim(f"axis{axis}", min=2, max=largest)
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        dynamic = (dynamic,)  # torch.export nests the specs of a ``*args`` parameter
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in quiet]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in quiet:  # the exporter's progress and "torchvision not installed" notes are noise here
            lg.setLevel(logging.ERROR)
        program = torch.onnx.export(module.eval(), example, dynamic_shapes=dynamic, input_names=input_names,
                                    output_names=output_names, opset_version=OPSET, dynamo=True,
                                    optimize=True, verbose=False)
        program.save(str(tmp), external_data=False)
        del program  # the exported program holds the weights again: gone before the check reads the file
    for lg, level in zip(quiet, levels):
        lg.setLevel(level)
    return _check_and_place(tmp, Path(path))


def save_onnx(model: onnx.ModelProto, path: Path, initializers=()) -> str:
    """Write ``model`` (one file), check it and put it at ``path`` atomically; returns its sha256.

    ``initializers``: ``(name, array)`` pairs added to the model's graph as they are written, one at
    a time, so a large model's weights are never also held as protobuf (nor as its serialised bytes).
    Protocol buffers merge a message's fields in any order: the graph's own fields, then these.
    The checker runs before the weights are written, on the graph with each initializer declared as
    an input of its type and shape (its shape inference needs no values): checking the written file
    loaded the weights once more (170 MB for MiniLM, the top of a text workspace's export)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    skeleton.graph.input.extend(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                                                                   a.shape) for name, a in initializers)
    onnx.checker.check_model(skeleton, full_check=True)
    tmp = _temporary(path)
    graph = model.graph.SerializeToString()
    tensors = []
    for name, array in initializers:
        head = onnx.TensorProto(name=name, dims=array.shape,
                                data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype)).SerializeToString()
        raw = _key(9) + _varint(array.nbytes)  # raw_data, little-endian as the format says
        tensors.append((head + raw, np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")))
    sizes = [len(h) + a.nbytes for h, a in tensors]
    with open(tmp, "wb") as f:
        rest = onnx.ModelProto()
        rest.CopyFrom(model)
        rest.ClearField("graph")
        f.write(rest.SerializeToString())
        f.write(_key(7) + _varint(len(graph) + sum(len(_key(5) + _varint(n)) + n for n in sizes)))
        f.write(graph)
        for (head, array), n in zip(tensors, sizes):
            f.write(_key(5) + _varint(n) + head)
            f.write(memoryview(array).cast("B"))
    return _place(tmp, Path(path))


def _key(field: int) -> bytes:
    """The key of a length-delimited protobuf field."""
    return _varint(field << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _temporary(path: Path) -> Path:
    """Where ``path`` is written before it is checked (its folder made), beside it: one rename places it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _check_and_place(tmp: Path, path: Path) -> str:
    # given the path, the checker reads the file itself: no Python copy of the model and of its bytes
    # (two copies of MiniLM's 90 MB were the top of a text workspace's export)
    onnx.checker.check_model(str(tmp), full_check=True)
    return _place(tmp, path)


def _place(tmp: Path, path: Path) -> str:
    tmp.replace(path)
    return sha256_file(path)
