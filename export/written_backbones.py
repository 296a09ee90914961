"""Backbone graphs written from their weights (no ``torch.onnx``), as packs are.

Why: PyTorch's exporter was the top of a workspace's one-off backbone export: its modules (about
190 MB, in the export's child process) and, for a text workspace, three copies of MiniLM's 90 MB of
weights. The export's child: 538 -> 324 MB on AV-Digits, 968 -> 571 MB on the text workspace. Each
graph is the backbone's ``forward``, operator for operator, so its taps match PyTorch's to float32
rounding (``tests/test_written_backbones.py``, ``tests/test_text.py``):

- ``efficientnet-lite0``: TensorFlow "SAME" padding as the convolutions' pads, each batch norm folded
  into its convolution (as the exporter did), taps pooled by a [map, grid^2] matrix (adaptive
  pooling's windows, overlapping ones included);
- ``efficientnet-lite0-video``: the frames through it, their taps pooled over time;
- ``rocket``: one convolution per dilation, then per time segment the share of positive values and
  the maximum;
- ``minilm-l6``: onnxruntime fuses its attention, LayerNorms and GELUs when it loads it; it runs
  10-14% faster than the exported graph did (batch 1, 10-128 tokens);
- ``raw`` and ``identity``: the input as one token.

Inputs and outputs are the exporter's: ``x`` ``[batch, *input_shape]`` (a text's ``tokens`` axis
free up to ``max_tokens``), one output per tap, named as the taps.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from mmcl_edge.export.onnx_io import OPSET, GraphWriter


def written_model(backbone, input_name: str = "x") -> tuple[onnx.ModelProto, list] | None:
    """The ONNX model of ``backbone`` written from its weights, as (the model without its
    initializers, ``(name, array)`` initializers) for ``onnx_io.save_onnx``; None for a backbone that
    only PyTorch's exporter writes."""
    from mmcl_edge.backbones import (EfficientNetLite0, MiniLMTextEncoder, RandomConvSeriesEncoder,
                                     RawSignalBackbone, VectorBackbone, VideoFrameBackbone)

    if type(backbone) is MiniLMTextEncoder:
        return _minilm_model(backbone, input_name)
    if type(backbone) is VectorBackbone:
        w = GraphWriter()
        w.op("Unsqueeze", [input_name, w.const([1], "axes_1", np.int64)], outputs=[backbone.taps[0].name])
        return _model(w, "identity_taps", backbone, input_name, ["batch", *backbone.input_shape])
    if type(backbone) is RawSignalBackbone:
        w = GraphWriter()
        w.op("Reshape", [input_name, w.const([0, 1, -1], "shape_one_token", np.int64)], outputs=[backbone.taps[0].name])
        return _model(w, "raw_taps", backbone, input_name, ["batch", *backbone.input_shape])
    if type(backbone) is EfficientNetLite0:
        w = GraphWriter()
        _efficientnet(w, backbone, input_name, [t.name for t in backbone.taps])
        return _model(w, "efficientnet_lite0_taps", backbone, input_name, ["batch", *backbone.input_shape])
    if type(backbone) is VideoFrameBackbone:
        return _video_model(backbone, input_name)
    if type(backbone) is RandomConvSeriesEncoder:
        return _rocket_model(backbone, input_name)
    return None


def _adaptive_pool(n_in: int, n_out: int) -> np.ndarray:
    """``[n_in, n_out]``: column j averages the inputs of adaptive average pooling's window j
    (``floor(j n_in / n_out)`` to ``ceil((j + 1) n_in / n_out)``), as PyTorch's adaptive pooling."""
    m = np.zeros((n_in, n_out), np.float32)
    for j in range(n_out):
        lo, hi = (j * n_in) // n_out, -(-((j + 1) * n_in) // n_out)
        m[lo:hi, j] = 1.0 / (hi - lo)
    return m


def _efficientnet(w: GraphWriter, net, x: str, tap_names: list[str]) -> None:
    """EfficientNetLite0.forward on ``x`` [N, 3, S, S]; each tap ``[N, grid^2, C]`` named as given."""
    weights = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    size = [net.image_size]  # the feature map's side, known at every layer: padding is a constant

    def conv_bn(x: str, name: str, mod) -> str:
        k, stride = mod.kernel, mod.stride
        pad = max((-(-size[0] // stride) - 1) * stride + k - size[0], 0)   # TensorFlow "SAME", as _tf_same_pad
        size[0] = (size[0] + pad - k) // stride + 1
        # the batch norm folded into the convolution (as PyTorch's exporter did): a quantised graph
        # then has no float32 operator between its convolutions and their activations
        bn = {f: weights[f"{name}.bn.{f}"].astype(np.float64) for f in ("weight", "bias", "running_mean", "running_var")}
        scale = bn["weight"] / np.sqrt(bn["running_var"] + mod.bn.eps)
        kernel = (weights[f"{name}.conv.weight"] * scale[:, None, None, None]).astype(np.float32)
        bias = (bn["bias"] - bn["running_mean"] * scale).astype(np.float32)
        y = w.op("Conv", [x, w.const(kernel, f"{name}.weight"), w.const(bias, f"{name}.bias")], kernel_shape=[k, k],
                 strides=[stride, stride], group=mod.conv.groups,
                 pads=[pad // 2, pad // 2, pad - pad // 2, pad - pad // 2])              # top, left, bottom, right
        return w.op("Clip", [y, "zero_f", "six_f"]) if mod.act else y

    def tokens(fmap: str, channels: int, name: str) -> None:
        if net.grid == 1:  # the whole map (a video's frames, 16 a clip): a mean, as the exporter wrote it
            pooled = w.op("ReduceMean", [fmap, w.const([2, 3], "axes_space", np.int64)], keepdims=0)
            w.op("Unsqueeze", [pooled, w.const([1], "axes_1", np.int64)], outputs=[name])
            return
        side = _adaptive_pool(size[0], net.grid)
        pool = np.einsum("ab,cd->acbd", side, side).reshape(size[0] * size[0], net.grid * net.grid)
        flat = w.op("Reshape", [fmap, w.const([0, channels, -1], f"{name}.flat", np.int64)])
        w.op("Transpose", [w.op("MatMul", [flat, w.const(pool, f"{name}.pool")])], outputs=[name], perm=[0, 2, 1])

    w.const(0.0, "zero_f")
    w.const(6.0, "six_f")
    h = conv_bn(x, "stem", net.stem)
    taps = iter(tap_names)
    for i, block in enumerate(net.blocks):
        y = conv_bn(h, f"blocks.{i}.expand", block.expand) if block.expand is not None else h
        y = conv_bn(conv_bn(y, f"blocks.{i}.depthwise", block.depthwise), f"blocks.{i}.project", block.project)
        h = w.op("Add", [h, y]) if block.residual else y
        if i in net._tap_after:
            tokens(h, block.project.conv.out_channels, next(taps))
    tokens(conv_bn(h, "head", net.head), net.head.conv.out_channels, next(taps))


def _video_model(video, input_name: str) -> tuple[onnx.ModelProto, list]:
    """VideoFrameBackbone.forward: every frame through EfficientNet-Lite0, its taps pooled over time."""
    w = GraphWriter()
    frames = w.op("Reshape", [input_name, w.const([-1, *video.input_shape[1:]], "shape_frames", np.int64)])
    net = video.frame_net
    _efficientnet(w, net, frames, [f"frame_{t.name}" for t in net.taps])
    over_time = w.const(_adaptive_pool(video.frames, video.time_tokens).T, "time_pool")        # [T, F]
    for t in video.taps:
        per_clip = w.op("Reshape", [f"frame_{t.name}", w.const([-1, video.frames, t.dim], f"shape_clip_{t.name}",
                                                               np.int64)])
        w.op("MatMul", [over_time, per_clip], outputs=[t.name])                                     # [B, T, D]
    return _model(w, "efficientnet_lite0_video_taps", video, input_name, ["batch", *video.input_shape])


def _rocket_model(enc, input_name: str) -> tuple[onnx.ModelProto, list]:
    """RandomConvSeriesEncoder.forward: per dilation one Conv, then per time segment the proportion
    of positive values and the maximum."""
    w = GraphWriter()
    weights = {k: v.detach().cpu().numpy() for k, v in enc.state_dict().items()}
    last = w.const([-1], "axes_last", np.int64)
    outs: list[list[str]] = [[] for _ in enc.taps]
    for i, d in enumerate(enc.dilations):
        y = w.op("Conv", [input_name, w.const(weights[f"weight_{i}"], f"weight_{i}"),
                          w.const(weights[f"bias_{i}"], f"bias_{i}")],
                 kernel_shape=[9], pads=[4 * d, 4 * d], dilations=[d])
        k = weights[f"weight_{i}"].shape[0]
        y = w.op("Reshape", [y, w.const([0, k, enc.segments, -1], f"shape_segments_{i}", np.int64)])
        positive = w.op("Cast", [w.op("Greater", [y, w.const(0.0, f"zero_{i}")])], to=TensorProto.FLOAT)
        outs[enc.tap_of[i]].append(w.op("Concat", [w.op("ReduceMean", [positive, last], keepdims=0),
                                                   w.op("ReduceMax", [y, last], keepdims=0)], axis=1))
    for t, parts in zip(enc.taps, outs):
        w.op("Transpose", [w.op("Concat", parts, axis=1)], outputs=[t.name], perm=[0, 2, 1])
    return _model(w, "rocket_taps", enc, input_name, ["batch", *enc.input_shape])


def _model(w: GraphWriter, name: str, backbone, input_name: str, input_dims: list) -> tuple[onnx.ModelProto, list]:
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_dims)]
    outputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, ["batch", t.tokens, t.dim]) for t in backbone.taps]
    opsets = [helper.make_opsetid("", OPSET)]
    # no initializers in the model: save_onnx streams them (as packs: the oldest IR version of the opset)
    model = helper.make_model(helper.make_graph(w.nodes, name, inputs, outputs), opset_imports=opsets,
                              producer_name="mmcl-edge", ir_version=helper.find_min_ir_version_for(opsets))
    return model, w.initializers


def _minilm_model(encoder, input_name: str) -> tuple[onnx.ModelProto, list]:
    """``MiniLMTextEncoder.forward`` as ONNX operators, with the encoder's own weights."""
    weights = {k: v.detach().cpu().numpy() for k, v in encoder.state_dict().items()}
    d, heads, chunks = encoder.width, encoder.heads, encoder.chunks
    w = GraphWriter()

    def linear(x: str, name: str) -> str:  # x @ W.T + b, W.T stored so the product needs no transpose
        wt = w.const(np.ascontiguousarray(weights[f"{name}.weight"].T), f"{name}.weight_t")
        return w.op("Add", [w.op("MatMul", [x, wt]), w.const(weights[f"{name}.bias"], f"{name}.bias")])

    def layer_norm(x: str, name: str) -> str:
        return w.op("LayerNormalization", [x, w.const(weights[f"{name}.weight"], f"{name}.weight"),
                                           w.const(weights[f"{name}.bias"], f"{name}.bias")], axis=-1, epsilon=1e-12)

    ids = w.op("Cast", [w.op("Gather", [input_name, w.const(0, "row_ids", np.int64)], axis=1)], to=TensorProto.INT64)
    mask = w.op("Gather", [input_name, w.const(1, "row_mask", np.int64)], axis=1)                    # [B, L]
    length = w.op("Gather", [w.op("Shape", [ids]), w.const(1, "axis_tokens", np.int64)])             # L
    pos = w.op("Range", [w.const(0, "zero_i", np.int64), length, w.const(1, "one_i", np.int64)])      # [L]
    embedded = w.op("Add", [w.op("Add", [w.op("Gather", [w.const(weights["word.weight"], "word.weight"), ids]),
                                         w.op("Gather", [w.const(weights["position.weight"], "position.weight"), pos])]),
                            w.const(weights["token_type.weight"][0], "token_type.row0")])           # type 0 for all
    h = layer_norm(embedded, "embed_norm")
    bias = w.op("Unsqueeze", [w.op("Mul", [w.op("Sub", [w.const(1.0, "one"), mask]), w.const(-1e4, "minus_1e4")]),
                              w.const([1, 2], "axes_heads_rows", np.int64)])                       # [B, 1, 1, L]

    # pooling weights, as MiniLMTextEncoder._pool_weights: the whole text, then `chunks` parts by position
    sums = w.const([1], "axes_1", np.int64)
    n_real = w.op("Max", [w.op("ReduceSum", [mask, sums], keepdims=1), w.const(1.0, "one_f")])        # [B, 1]
    chunk = w.op("Floor", [w.op("Div", [w.op("Mul", [w.op("Unsqueeze", [w.op("Cast", [pos], to=TensorProto.FLOAT),
                                                                      w.const([0], "axes_0", np.int64)]),
                                                    w.const(float(chunks), "chunks")]), n_real])])   # [B, L]
    mask3 = w.op("Unsqueeze", [mask, sums])                                                          # [B, 1, L]
    in_chunk = w.op("Cast", [w.op("Equal", [w.op("Unsqueeze", [chunk, sums]),
                                            w.const(np.arange(chunks, dtype=np.float32)[None, :, None], "chunk_ids")])],
                    to=TensorProto.FLOAT)                                                            # [B, chunks, L]
    pool = w.op("Concat", [mask3, w.op("Mul", [mask3, in_chunk])], axis=1)                          # [B, 1 + chunks, L]
    pool = w.op("Div", [pool, w.op("Max", [w.op("ReduceSum", [pool, w.const([-1], "axes_last", np.int64)], keepdims=1),
                                           "one_f"])])

    split = w.const([0, 0, heads, d // heads], "shape_heads", np.int64)
    merge = w.const([0, 0, d], "shape_merged", np.int64)
    scale = w.const(float((d // heads) ** -0.5), "attention_scale")
    half, root2 = w.const(0.5, "half"), w.const(float(np.sqrt(2.0)), "sqrt2")
    outputs = []
    for i in range(1, encoder.layers + 1):
        p = f"blocks.{i - 1}"
        q = w.op("Transpose", [w.op("Reshape", [linear(h, f"{p}.q"), split])], perm=[0, 2, 1, 3])     # [B, H, L, dh]
        k = w.op("Transpose", [w.op("Reshape", [linear(h, f"{p}.k"), split])], perm=[0, 2, 3, 1])     # [B, H, dh, L]
        v = w.op("Transpose", [w.op("Reshape", [linear(h, f"{p}.v"), split])], perm=[0, 2, 1, 3])
        att = w.op("Softmax", [w.op("Add", [w.op("Mul", [w.op("MatMul", [q, k]), scale]), bias])], axis=-1)
        ctx = w.op("Reshape", [w.op("Transpose", [w.op("MatMul", [att, v])], perm=[0, 2, 1, 3]), merge])
        h = layer_norm(w.op("Add", [h, linear(ctx, f"{p}.o")]), f"{p}.norm1")
        up = linear(h, f"{p}.up")
        gelu = w.op("Mul", [w.op("Mul", [up, half]), w.op("Add", [w.op("Erf", [w.op("Div", [up, root2])]), "one"])])
        h = layer_norm(w.op("Add", [h, linear(gelu, f"{p}.down")]), f"{p}.norm2")
        if i in encoder.tap_layers:
            tap = encoder.taps[encoder.tap_layers.index(i)]
            outputs.append(w.op("MatMul", [pool, h], outputs=[tap.name]))

    return _model(w, "minilm_l6_taps", encoder, input_name, ["batch", 2, "tokens"])
