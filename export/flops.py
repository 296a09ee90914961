"""How much arithmetic a backbone does per sample: multiply-adds of its Conv, MatMul and Gemm
operators (x2 = FLOPs), read off the exported ONNX graph with shapes inferred at batch 1.

Element-wise work (activations, normalisation) is left out: it is small beside the convolutions
and bound by memory, not arithmetic. Used to state a backbone's achieved GFLOP/s next to what the
processor can do (``mmcl-edge bench latency``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _dims(value_info) -> list[int] | None:
    shape = value_info.type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return None if any(d is None for d in dims) else dims


def count_flops(path: Path, batch: int = 1, sample_shape: list[int] | None = None) -> dict:
    """``{"flops": total per sample, "by_op": {op: flops}, "uncounted": [ops whose shapes were unknown]}``.

    ``sample_shape`` (the backbone's declared input shape) fixes the other free axes too: a text
    backbone is counted at its longest input (``max_tokens``)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    for inp in model.graph.input:  # a concrete batch, so every shape downstream is concrete
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if i == 0 or (sample_shape and not d.HasField("dim_value") and i - 1 < len(sample_shape)):
                size = batch if i == 0 else int(sample_shape[i - 1])
                d.Clear()
                d.dim_value = size
    model = shape_inference.infer_shapes(model, data_prop=True)
    g = model.graph
    shapes = {v.name: _dims(v) for v in list(g.value_info) + list(g.input) + list(g.output)}
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    by_op: dict[str, float] = {}
    uncounted: list[str] = []
    for node in g.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        a = shapes.get(node.input[0])
        w = shapes.get(node.input[1])
        y = shapes.get(node.output[0])
        if not (a and w and y):
            uncounted.append(node.name or node.op_type)
            continue
        if node.op_type == "Conv":
            # each output element: (C_in / groups) * kernel multiply-adds; weight is [C_out, C_in/groups, *k]
            macs = float(np.prod(y)) * float(np.prod(w[1:]))
        elif node.op_type == "MatMul":
            macs = float(np.prod(y)) * a[-1]
        else:
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            macs = float(np.prod(y)) * (a[0] if trans_a else a[-1])
        by_op[node.op_type] = by_op.get(node.op_type, 0.0) + 2.0 * macs
    total = sum(by_op.values()) / batch
    return {"flops": total, "by_op": {k: v / batch for k, v in by_op.items()}, "uncounted": uncounted}


def reference_gflops(threads: int = 0, size: int = 1024, repeats: int = 10) -> float:
    """What onnxruntime does here on one large float32 matrix product (its own GEMM kernels, the
    runtime's thread setting), GFLOP/s: the practical ceiling a backbone's achieved rate is held to."""
    import time

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mmcl_edge.runtime import providers as prov

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])], [w])
    # IR 9: what every onnxruntime since 1.15 reads (a new onnx package writes a newer IR by default)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    sess = prov.session(model.SerializeToString(), ["CPUExecutionProvider"], threads)
    x = rng.standard_normal((size, size), dtype=np.float32)
    sess.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        best = min(best, time.perf_counter() - t)
    return 2.0 * size ** 3 / best / 1e9
