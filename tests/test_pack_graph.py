"""The pack graph written from the weights (export/pack_graph.py) computes the model exactly."""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mmcl_edge.backbones import TapSpec
from mmcl_edge.config import EncoderConfig
from mmcl_edge.export.pack_graph import HALF_MIN_ELEMENTS, build_pack_model, save_pack_model
from mmcl_edge.model import MMCLModel
from mmcl_edge.runtime.graph_check import ALLOWED_OPS, check_graph_bytes


def half_rounded(model):
    """A copy of ``model`` whose tensors the pack stores as float16 are rounded to float16."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype == torch.float32 and t.numel() >= HALF_MIN_ELEMENTS:
                t.copy_(t.half().float())
    return model


def random_model(taps, head_mode="analytic", **encoder) -> MMCLModel:
    torch.manual_seed(len(taps) * 7 + len(encoder))
    model = MMCLModel(taps, EncoderConfig(**{"width": 32, "experts": 4, "bottleneck": 8, **encoder}), "class-il",
                      n_classes=5, head_blocks=[3, 2], head_mode=head_mode).eval()
    with torch.no_grad():   # every weight non-trivial (experts' up maps start at zero)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.1) + (1.0 if name.endswith("norm.weight") else 0.0))
        if model.analytic is not None:
            model.analytic.weight.copy_(torch.randn_like(model.analytic.weight) * 0.1)
    return model


def run_graph(onnx_model, taps, present):
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {f"{m}__{spec.name}": x.numpy() for m, (specs, xs) in taps.items() for spec, x in zip(specs, xs)}
    feeds["present"] = present.numpy()
    return session.run(["logits", "fused"], feeds)


def inputs(model, batch=6):
    gen = torch.Generator().manual_seed(3)
    taps = {m: (specs, [torch.randn(batch, t.tokens, t.dim, generator=gen) for t in specs])
            for m, specs in model.encoder.modality_taps.items()}
    present = torch.ones(batch, len(taps))
    present[1, 0] = 0           # a sample without its first modality
    present[2, -1] = 0          # one without its last
    present[3] = 0              # and one with none at all: zero state, nothing fused
    for m, (_, xs) in taps.items():   # an absent modality's taps are zeros, as the runtime feeds them
        i = list(taps).index(m)
        for x in xs:
            x[present[:, i] == 0] = 0
    return taps, present


TWO_MODALITIES = {"audio": (TapSpec("a", 4, 24), TapSpec("b", 4, 40), TapSpec("c", 4, 300)),
                  "image": (TapSpec("a", 4, 24), TapSpec("b", 4, 40), TapSpec("c", 4, 300))}
UNEVEN = {"imu": (TapSpec("short", 8, 16),),                       # one tap feeds every depth
          "depth": (TapSpec("s4", 4, 20), TapSpec("head", 2, 64)),  # other token counts: one Gemm per tap
          "text": (TapSpec("cls", 1, 48), TapSpec("mean", 1, 48), TapSpec("last", 1, 48))}


@pytest.mark.parametrize("taps,head_mode,encoder", [
    (TWO_MODALITIES, "analytic", {"tap_rank": 8}),
    (TWO_MODALITIES, "linear", {"tap_rank": 8, "top_k": 1}),
    (UNEVEN, "analytic", {"tap_rank": 0, "depths": 3}),
    (UNEVEN, "analytic", {"tap_rank": 4, "cross_modal_routing": False, "depths": 2, "top_k": 3}),
], ids=["two-modalities", "linear-head-top1", "uneven-taps-full-rank", "per-modality-routing"])
def test_the_written_graph_computes_the_model(taps, head_mode, encoder):
    model = random_model(taps, head_mode, **encoder)
    graph, _ = build_pack_model(model)
    check_graph_bytes(graph.SerializeToString(), ALLOWED_OPS)   # the runtime's allow-list accepts it
    assert graph.ir_version <= 9   # onnxruntime 1.17, pyproject's floor, reads IR <= 9 (packs were IR 14)
    x, present = inputs(model)
    with torch.no_grad():   # the graph's weights are rounded as the pack will store them
        logits, out = half_rounded(model)({m: xs for m, (_, xs) in x.items()}, present)
        plain, _ = model({m: xs for m, (_, xs) in x.items()}, present)
    got_logits, got_fused = run_graph(graph, x, present)
    assert got_logits.shape == tuple(logits.shape) and got_fused.shape == tuple(out.fused.shape)
    assert np.abs(logits.numpy()).max() > 0.1   # a real signal, not zeros on both sides
    assert np.max(np.abs(got_logits - logits.numpy())) <= 1e-4
    assert np.max(np.abs(got_fused - out.fused.numpy())) <= 1e-4
    assert np.max(np.abs(got_logits - plain.numpy())) > 1e-6   # the rounding is real: the check above can fail


def test_a_saved_pack_is_the_graph_and_int8_weights_halve_it_at_a_small_error(tmp_path):
    import onnx

    model = random_model(TWO_MODALITIES, "analytic", tap_rank=8)
    x, present = inputs(model)
    graph, sizes = build_pack_model(model)
    in_memory = run_graph(graph, x, present)
    save_pack_model(graph, tmp_path / "pack.onnx")
    for a, b in zip(in_memory, run_graph(onnx.load(str(tmp_path / "pack.onnx")), x, present)):
        assert np.array_equal(a, b)
    assert sizes["weights_bytes_stored"] < 0.6 * sizes["weights_bytes_fp32"]

    small, small_sizes = build_pack_model(model, "int8")
    check_graph_bytes(small.SerializeToString(), ALLOWED_OPS)
    assert small_sizes["weights_bytes_stored"] < 0.75 * sizes["weights_bytes_stored"]
    got, _ = run_graph(small, x, present)
    ref = in_memory[0]
    # int8 with a scale per output feature: the logits move by about 1% of their range, no more
    assert 1e-5 < np.max(np.abs(got - ref)) <= 0.03 * np.abs(ref).max()
    with pytest.raises(ValueError, match="pack weights"):
        build_pack_model(model, "int4")


def test_publishing_a_pack_loads_no_pytorch_exporter(tmp_path):
    """The learner writes packs without torch.onnx or onnxscript (resident ~60-150 MB once loaded)."""
    code = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
from test_pack_graph import random_model, TWO_MODALITIES
from mmcl_edge.export.pack_export import export_pack
model = random_model(TWO_MODALITIES, "analytic", tap_rank=8)
export_pack(model, Path({str(tmp_path / 'p')!r}), version=1, task=0, classes=[0, 1, 2, 3, 4],
            label_names=list("abcde"), setting="class-il", preprocess={{}}, backbones={{}})
loaded = sorted(m for m in sys.modules if m.startswith(("torch.onnx", "onnxscript", "torch._dynamo")))
print("LOADED", loaded)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout, out.stdout[-2000:]
    assert (tmp_path / "p" / "pack.onnx").is_file()
