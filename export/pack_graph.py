"""The pack's ONNX graph, written from the learned weights (no tracing, no ``torch.onnx``).

Why write it instead of exporting it: a pack is built on the device after every task, often beside
a live service. Tracing loads ``torch.onnx`` and the onnxscript optimizer into the learner (~60-150
MB that never leave the process) and emits the graph PyTorch happens to run: ~200 small operators,
a copy of the index arithmetic of every ``stack``/``cat``, a LayerNorm for every router and expert
pool. Written here, the same computation is fewer, larger operators:

- all taps' projections (one per modality and depth) are one batched ``MatMul``;
- each depth's router is one ``Gemm`` over all modalities' states, its experts two ``MatMul``s over
  the experts' weights side by side, the gates expanded to the experts' hidden units by a product;
- no index arithmetic, no shape computations: every shape is a constant with a free batch axis.

Every weight is the model's own tensor, reshaped or concatenated but never multiplied by another
(folding a LayerNorm's scale into the next matrix would round differently once stored as float16),
so a pack equals the model with its weights rounded as stored, to float32 rounding:
``tests/test_pack_graph.py`` holds them to 1e-4 on random models with absent modalities, and
``tests/test_export_parity.py`` on a learned one. Only operators of the runtime's allow-list are
used (``runtime/graph_check.py``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from mmcl_edge.encoder import tap_for_depth
from mmcl_edge.export.onnx_io import OPSET, GraphWriter
from mmcl_edge.runtime.pack import PRESENT_INPUT

LN_EPS = 1e-5        # nn.LayerNorm's default
NORMALIZE_EPS = 1e-12  # nn.functional.normalize's default


HALF_MIN_ELEMENTS = 256  # smaller tensors (biases, norms) stay float32: they cost nothing on disk
WEIGHT_STORAGE = ("float16", "int8")


class _Graph(GraphWriter):
    """The pack's builder, and the one place that decides how each weight is stored (``weight``)."""

    def __init__(self, storage: str = "float16"):
        if storage not in WEIGHT_STORAGE:
            raise ValueError(f"pack weights {storage!r}: use one of {', '.join(WEIGHT_STORAGE)}")
        super().__init__()
        self.storage = storage
        self.decode: list = []
        self.fp32_bytes = 0

    def weight(self, value: np.ndarray, name: str, *sources, per: int | None = None) -> str:
        """A weight built from the model's tensors ``sources``, stored at their precision.

        float16 when each source is large enough (``HALF_MIN_ELEMENTS``; a stacked or sliced weight
        is rounded as its parts would be, so a pack equals its model with the weights rounded as
        stored), float32 otherwise. With ``int8`` storage a large matrix given ``per`` (the axis
        that keeps one scale per slice) is stored as int8 with float32 scales. A stored weight is
        decoded by ``Cast`` (and ``Mul``) nodes at the head of the graph, on constants only, so
        onnxruntime folds them once when it loads the pack and every operator computes in float32.
        """
        value = np.asarray(value, np.float32)
        self.fp32_bytes += value.nbytes
        if name in self._names or not all(s.numel() >= HALF_MIN_ELEMENTS for s in sources):
            return self.const(value, name)
        if self.storage == "int8" and per is not None:
            other = tuple(a for a in range(value.ndim) if a != per % value.ndim)
            scale = np.abs(value).max(axis=other, keepdims=True) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            q = np.clip(np.rint(value / scale), -127, 127).astype(np.int8)
            self.const(q, f"{name}__int8", np.int8)
            self.const(scale, f"{name}__scale")
            as_float = f"{name}__int8_float"
            self.decode.append(helper.make_node("Cast", [f"{name}__int8"], [as_float], to=TensorProto.FLOAT,
                                                name=f"{name}__decode"))
            self.decode.append(helper.make_node("Mul", [as_float, f"{name}__scale"], [name], name=f"{name}__scale"))
            self._names.add(name)
            return name
        half = value.astype(np.float16)
        if value.size < HALF_MIN_ELEMENTS:   # a slice of a large tensor: its float16 values, kept as float32
            return self.const(half.astype(np.float32), name)
        self.const(half, f"{name}__fp16", np.float16)
        self.decode.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT,
                                            name=f"{name}__to_fp32"))
        self._names.add(name)
        return name


def save_pack_model(model: onnx.ModelProto, path: Path) -> None:
    """Check the ONNX ``model`` (``onnx.checker``, full) and write it to ``path`` atomically."""
    onnx.checker.check_model(model, full_check=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)


def _np(t) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def build_pack_model(model, storage: str = "float16") -> tuple[onnx.ModelProto, dict]:
    """The ONNX model of ``model`` (an ``MMCLModel`` in eval mode): inputs ``<modality>__<tap>``
    ``[B, T, D]`` in ``encoder.input_names()`` order, then ``present`` ``[B, M]``; outputs
    ``logits`` ``[B, classes]`` and ``fused`` ``[B, width]``; and what its weights weigh (float32 vs
    stored bytes). ``storage``: "float16" (a pack equals its model with the weights rounded so), or
    "int8" (its large matrices as int8 with a scale per output feature: about half the bytes)."""
    enc, cfg = model.encoder, model.encoder.cfg
    mods, depths, width = enc.modalities, cfg.depths, cfg.width
    m_count = len(mods)
    g = _Graph(storage)
    inputs = [helper.make_tensor_value_info(f"{m}__{t.name}", TensorProto.FLOAT, ["batch", t.tokens, t.dim])
              for m in mods for t in enc.modality_taps[m]]
    inputs.append(helper.make_tensor_value_info(PRESENT_INPUT, TensorProto.FLOAT, ["batch", m_count]))
    def layer_norm(x: str, norm, name: str) -> str:
        scale = g.weight(_np(norm.weight), f"{name}_w", norm.weight)
        shift = g.weight(_np(norm.bias), f"{name}_b", norm.bias)
        return g.op("LayerNormalization", [x, scale, shift], axis=-1, epsilon=LN_EPS)

    mask3 = g.op("Unsqueeze", [PRESENT_INPUT, g.ints([2], "axes_2")])          # [B, M, 1]
    mask4 = g.op("Unsqueeze", [PRESENT_INPUT, g.ints([1, 3], "axes_1_3")])     # [B, 1, M, 1]

    # 1. every (depth, modality) tap projection: LayerNorm -> rank map -> flatten -> one batched MatMul
    slots, feats_in = [], []
    for l in range(depths):
        for i, m in enumerate(mods):
            taps = enc.modality_taps[m]
            tap = taps[tap_for_depth(l, depths, len(taps))]
            proj = enc.proj[i][l]
            x = layer_norm(f"{m}__{tap.name}", proj.norm, f"p{l}_{m}_ln")
            if proj.reduce is not None:
                reduce = g.weight(_np(proj.reduce.weight).T, f"p{l}_{m}_reduce", proj.reduce.weight, per=-1)
                x = g.op("MatMul", [x, reduce])
            slots.append(proj)
            feats_in.append((x, proj.proj.in_features))
    sizes = {n for _, n in feats_in}
    if len(sizes) == 1:   # the usual case: one [depths*M] batch of [in, width] products
        n_in = sizes.pop()
        flat = [g.op("Reshape", [x, g.ints([0, 1, 1, n_in], f"shape_flat_{n_in}")]) for x, _ in feats_in]
        stacked = g.op("Concat", flat, axis=1)                                        # [B, L*M, 1, in]
        w = np.stack([_np(p.proj.weight).T for p in slots])                           # [L*M, in, W]
        b = np.stack([_np(p.proj.bias)[None] for p in slots])                         # [L*M, 1, W]
        w = g.weight(w, "proj_w", *(p.proj.weight for p in slots), per=-1)
        b = g.weight(b, "proj_b", *(p.proj.bias for p in slots))
        u = g.op("Add", [g.op("MatMul", [stacked, w]), b])
    else:                 # taps of different token counts or ranks: one Gemm each
        outs = []
        for k, ((x, n_in), p) in enumerate(zip(feats_in, slots)):
            x2 = g.op("Reshape", [x, g.ints([0, n_in], f"shape_2d_{n_in}")])
            y = g.op("Gemm", [x2, g.weight(_np(p.proj.weight), f"proj{k}_w", p.proj.weight, per=0),
                              g.weight(_np(p.proj.bias), f"proj{k}_b", p.proj.bias)], transB=1)
            outs.append(g.op("Reshape", [y, g.ints([0, 1, 1, width], "shape_slot")]))
        u = g.op("Concat", outs, axis=1)
    u = g.op("Mul", [g.op("Reshape", [u, g.ints([0, depths, m_count, width], "shape_u")]), mask4])  # [B, L, M, W]

    # 2. the depths: state += projection, route, add the chosen experts' outputs
    k = min(cfg.top_k, cfg.experts)
    n_exp, hidden = cfg.experts, cfg.bottleneck
    expand = np.kron(np.eye(n_exp), np.ones((1, hidden)))                      # [E, E*b]: a gate per hidden unit
    expand_name = g.const(expand, "gate_expand")
    state = None
    for l in range(depths):
        u_l = g.op("Gather", [u, g.const(np.array(l, np.int64), f"depth_{l}", np.int64)], axis=1)   # [B, M, W]
        state = u_l if state is None else g.op("Add", [state, u_l])
        router = enc.routers[l]
        x = layer_norm(state, router.norm, f"r{l}_ln")
        weights = [p.weight for p in router.proj]
        biases = [p.bias for p in router.proj]
        if router.cross_modal:   # every modality's router reads all states: one Gemm for all of them
            wr = g.weight(np.concatenate([_np(w) for w in weights]), f"r{l}_w", *weights, per=0)   # [M*E, M*W]
            br = g.weight(np.concatenate([_np(b) for b in biases]), f"r{l}_b", *biases)
            flat = g.op("Reshape", [x, g.ints([0, m_count * width], "shape_states_flat")])
            logits = g.op("Gemm", [flat, wr, br], transB=1)
        else:                    # each modality's router reads its own state: a batched MatMul
            wr = g.weight(np.stack([_np(w).T for w in weights]), f"r{l}_w", *weights, per=-1)      # [M, W, E]
            br = g.weight(np.stack([_np(b)[None] for b in biases]), f"r{l}_b", *biases)            # [M, 1, E]
            logits = g.op("Add", [g.op("MatMul", [g.op("Unsqueeze", [x, g.ints([2], "axes_2")]), wr]), br])
        logits = g.op("Reshape", [logits, g.ints([0, m_count, n_exp], "shape_gates")])
        top = g.op("TopK", [logits, g.ints([k], "top_k")], outputs=2, axis=-1)[0]
        kth = g.op("Gather", [top, g.ints([k - 1], "kth")], axis=-1)                  # [B, M, 1]
        masked = g.op("Where", [g.op("Less", [logits, kth]), g.const(-np.inf, "minus_inf"), logits])
        gates = g.op("Softmax", [masked], axis=-1)                                     # zero outside the top k

        experts = enc.pools[l].experts
        x = layer_norm(state, enc.expert_norm[l], f"e{l}_ln")
        downs, ups = [e.down.weight for e in experts], [e.up.weight for e in experts]
        down_b, up_b = [e.down.bias for e in experts], [e.up.bias for e in experts]
        wd = g.weight(np.concatenate([_np(w) for w in downs]).T, f"e{l}_down_w", *downs, per=-1)  # [W, E*b]
        bd = g.weight(np.concatenate([_np(b) for b in down_b]), f"e{l}_down_b", *down_b)
        h = g.op("Add", [g.op("MatMul", [x, wd]), bd])
        # gelu(h) = 0.5 h (1 + erf(h / sqrt 2)); the 0.5 goes into the up map (a power of two: exact)
        erf = g.op("Erf", [g.op("Mul", [h, g.const(np.float32(1 / math.sqrt(2)), "inv_sqrt2")])])
        act = g.op("Mul", [h, g.op("Add", [erf, g.const(np.float32(1.0), "one")])])
        act = g.op("Mul", [act, g.op("MatMul", [gates, expand_name])])                 # each expert's units x its gate
        wu = g.weight(0.5 * np.concatenate([_np(w) for w in ups], axis=1).T, f"e{l}_up_w", *ups, per=-1)  # [E*b, W]
        ub = g.weight(np.stack([_np(b) for b in up_b]), f"e{l}_up_b", *up_b)                            # [E, W]
        out = g.op("Add", [g.op("MatMul", [act, wu]), g.op("MatMul", [gates, ub])])
        state = g.op("Add", [state, out])

    # 3. per-modality output norms, then the mean over the modalities present
    scales, shifts = [n.weight for n in enc.out_norm], [n.bias for n in enc.out_norm]
    z = g.op("LayerNormalization", [state, g.const(np.ones(width), "ones_width")], axis=-1, epsilon=LN_EPS)
    z = g.op("Mul", [z, g.weight(np.stack([_np(w) for w in scales]), "out_w", *scales)])
    z = g.op("Add", [z, g.weight(np.stack([_np(b) for b in shifts]), "out_b", *shifts)])
    total = g.op("ReduceSum", [g.op("Mul", [z, mask3]), g.ints([1], "axes_1")], keepdims=0)
    count = g.op("Clip", [g.op("ReduceSum", [PRESENT_INPUT, g.ints([1], "axes_1")], keepdims=1),
                          g.const(np.float32(1.0), "one")])
    fused = g.op("Div", [total, count], outputs=["fused"])

    # 4. the head
    n_out = model.head.num_outputs
    if model.analytic is not None:
        pooled = []
        for m in mods:
            for t in enc.modality_taps[m]:
                mean = g.op("ReduceMean", [f"{m}__{t.name}", g.ints([1], "axes_1")], keepdims=0)
                norm = g.op("Clip", [g.op("ReduceL2", [mean, g.ints([-1], "axes_last")], keepdims=1),
                                     g.const(np.float32(NORMALIZE_EPS), "normalize_eps")])
                pooled.append(g.op("Div", [mean, norm]))
        scaled = g.op("Mul", [fused, g.const(np.float32(model.fused_scale), "fused_scale")])
        feats = g.op("Concat", [*pooled, scaled], axis=-1)
        head = model.analytic.weight
        w = _np(head)[:, :n_out]                           # [taps + 1 + W, C]
        one = model.fixed_feature_dim() - 1                # the constant-1 feature's row is the bias
        raw = g.op("Gemm", [feats, g.weight(np.concatenate([w[:one], w[one + 1:]]), "head_w", head, per=0),
                            g.weight(w[one], "head_b", head)])
        g.op("Mul", [raw, g.const(np.float32(model.analytic.logit_scale), "logit_scale")], outputs=["logits"])
    else:
        weights, biases = [b.weight for b in model.head.blocks], [b.bias for b in model.head.blocks]
        g.op("Gemm", [fused, g.weight(np.concatenate([_np(w) for w in weights]), "head_w", *weights, per=0),
                      g.weight(np.concatenate([_np(b) for b in biases]), "head_b", *biases)],
             outputs=["logits"], transB=1)

    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out]),
               helper.make_tensor_value_info("fused", TensorProto.FLOAT, ["batch", width])]
    graph = helper.make_graph(g.decode + g.nodes, "mmcl_pack", inputs, outputs, g.tensors())
    opsets = [helper.make_opsetid("", OPSET)]
    # the oldest IR version that carries the opset: onnxruntime 1.17 (the floor in pyproject) reads IR <= 9
    onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="mmcl-edge",
                                   ir_version=helper.find_min_ir_version_for(opsets))
    stored = sum(a.nbytes for _, a in g.initializers)
    return onnx_model, {"stored": storage, "weights_bytes_fp32": g.fp32_bytes, "weights_bytes_stored": stored}
