"""Parity of the exported graphs with PyTorch on real AV-Digits data (fp32, CPU)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mmcl_edge.learners import AdapterLearner
from mmcl_edge.preprocess import preprocess_batch
from mmcl_edge.runtime import Runtime
from mmcl_edge.stream import label_map
from test_pack_graph import half_rounded


def cpu_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_backbone_onnx_taps_match_pytorch(avdigits_ws):
    sc, src = avdigits_ws.scenario(), avdigits_ws.tap_source()
    index = json.loads((avdigits_ws.root / "backbones" / "backbones.json").read_text())["modalities"]
    for m, backbone in src.backbones.items():
        path = avdigits_ws.root / "backbones" / index[m]["file"]
        onnx.checker.check_model(onnx.load(str(path)))
        x = preprocess_batch(sc.test.samples[m][:24], sc.specs[m])
        with torch.no_grad():
            expected = [t.numpy() for t in backbone(torch.from_numpy(x))]
        got = cpu_session(path).run(None, {"x": x})
        assert len(got) == len(expected) == len(backbone.taps)
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            assert np.max(np.abs(g - e)) <= 1e-4


def test_pack_onnx_logits_match_pytorch(avdigits_ws):
    sc, src = avdigits_ws.scenario(), avdigits_ws.tap_source()
    last = len(sc.tasks) - 1
    model = avdigits_ws.load_model(last).eval()
    idx = np.arange(len(sc.test.y))
    data, _, _ = src.taps("test", idx, label_map(sc, last))
    taps = {m: [torch.from_numpy(t).float() for t in ts] for m, ts in data.taps.items()}
    with torch.no_grad():
        logits, out = model(taps)
    pack = avdigits_ws.root / "packs" / (avdigits_ws.root / "current").read_text().strip()
    feeds = {f"{m}__{spec.name}": t for m, ts in data.taps.items()
             for spec, t in zip(src.backbones[m].taps, ts)}
    feeds["present"] = np.ones((len(idx), len(data.taps)), np.float32)
    got_logits, got_fused = cpu_session(pack / "pack.onnx").run(["logits", "fused"], feeds)
    assert got_logits.shape == (len(idx), 10)
    # the pack stores its weights as float16 (relative rounding <= 2**-11): against the float32
    # model the logits (range about -5..15) move by a few thousandths, and no decision changes
    assert np.max(np.abs(got_logits - logits.numpy())) <= 2e-2
    assert np.mean(got_logits.argmax(1) == logits.numpy().argmax(1)) >= 0.995
    # against the same model with its weights rounded as the pack stores them, the graph is exact
    model = half_rounded(model)
    with torch.no_grad():
        logits, out = model(taps)
    assert np.max(np.abs(got_logits - logits.numpy())) <= 1e-4
    assert np.max(np.abs(got_fused - out.fused.numpy())) <= 1e-4
    # a sensor dropped out: the audio taps are zeros and marked absent, in PyTorch and in the pack
    present = torch.tensor([[0.0, 1.0]]).repeat(len(idx), 1)
    zeroed = {m: ([torch.zeros_like(t) for t in ts] if m == "audio" else ts) for m, ts in taps.items()}
    with torch.no_grad():
        logits, _ = model(zeroed, present)
    feeds = {k: (np.zeros_like(v) if k.startswith("audio__") else v) for k, v in feeds.items()}
    feeds["present"] = present.numpy()
    got_logits, _ = cpu_session(pack / "pack.onnx").run(["logits", "fused"], feeds)
    assert np.max(np.abs(got_logits - logits.numpy())) <= 1e-4


def test_runtime_agrees_with_pytorch_on_whole_test_set(avdigits_ws):
    sc, src = avdigits_ws.scenario(), avdigits_ws.tap_source()
    last = len(sc.tasks) - 1
    learner = AdapterLearner(avdigits_ws.config, src.modality_taps, sc.setting, sc.num_classes,
                             model=avdigits_ws.load_model(last))
    idx = np.arange(len(sc.test.y))
    data, _, _ = src.taps("test", idx, label_map(sc, last))
    torch_pred = learner.predict(data)
    rt = Runtime(avdigits_ws.root, providers="cpu")
    runtime_pred = np.concatenate([
        rt.predict({m: sc.test.samples[m][b:b + 50] for m in sc.specs}).indices for b in range(0, len(idx), 50)])
    agreement = float(np.mean(runtime_pred == torch_pred))
    assert agreement >= 0.999, f"runtime agrees with PyTorch on {agreement:.2%} of {len(idx)} samples"
    # and the method learned: far above chance (10 classes) on the whole test set
    assert np.mean(torch_pred == data.y) > 0.8
