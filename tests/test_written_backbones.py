"""Backbone graphs written from their weights (``export/written_backbones.py``) against the PyTorch
backbones they stand for, in a real onnxruntime session; and the export that writes them never
loads PyTorch's exporter. (The text encoder's are in ``tests/test_text.py``.)"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the learner's backbones need torch (the learn extra)")
ort = pytest.importorskip("onnxruntime", reason="the runtime needs onnxruntime")

from mmcl_edge.backbones import (EfficientNetLite0, RandomConvSeriesEncoder, RawSignalBackbone,  # noqa: E402
                                 TinyConvBackbone, VectorBackbone, VideoFrameBackbone)
from mmcl_edge.export.onnx_io import save_onnx  # noqa: E402
from mmcl_edge.export.written_backbones import written_model  # noqa: E402

CASES = {
    # 96 px: taps pooled from 6x6 and (overlapping windows) 3x3 maps into 2x2 tokens; 64 px: 4x4 and 2x2
    "efficientnet-96": lambda: EfficientNetLite0(96),
    "efficientnet-64-grid3": lambda: EfficientNetLite0(64, grid=3),
    "video": lambda: VideoFrameBackbone(32, frames=6, time_tokens=4),
    "rocket": lambda: RandomConvSeriesEncoder(3, 64),
    "rocket-one-segment": lambda: RandomConvSeriesEncoder(5, 50),
    "raw": lambda: RawSignalBackbone((3, 10)),
    "vector": lambda: VectorBackbone(7),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_written_backbone_gives_the_backbones_taps(case, tmp_path):
    backbone = CASES[case]()
    model, initializers = written_model(backbone)
    assert model.ir_version <= 9  # what onnxruntime 1.17, pyproject's floor, reads
    save_onnx(model, tmp_path / "b.onnx", initializers)
    session = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.standard_normal((batch, *backbone.input_shape)).astype(np.float32)
        with torch.inference_mode():
            want = [t.numpy() for t in backbone(torch.from_numpy(x))]
        got = session.run(None, {"x": x})
        assert [o.name for o in session.get_outputs()] == [t.name for t in backbone.taps]
        for w, g in zip(want, got):
            assert w.shape == g.shape
            assert float(np.abs(w - g).max()) <= 1e-4 * max(1.0, float(np.abs(w).max()))


def test_a_backbone_without_a_writer_goes_to_the_exporter():
    assert written_model(TinyConvBackbone(16)) is None


def test_a_bad_written_graph_is_refused_before_anything_is_written(tmp_path):
    """The checker runs on the graph (weights declared by type and shape) before the file is written."""
    import onnx

    model, initializers = written_model(EfficientNetLite0(32))
    model.graph.node[3].input[0] = "nowhere"
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        save_onnx(model, tmp_path / "b.onnx", initializers)
    assert list(tmp_path.iterdir()) == []


WRITTEN_EXPORT = r"""
import json, sys
from mmcl_edge.backbones import EfficientNetLite0, RandomConvSeriesEncoder, VideoFrameBackbone
from mmcl_edge.export.backbone_export import export_backbone
for i, bb in enumerate((EfficientNetLite0(64), VideoFrameBackbone(32, frames=4), RandomConvSeriesEncoder(3, 64))):
    export_backbone(bb, f"{sys.argv[1]}/b{i}.onnx")
print(json.dumps(sorted({".".join(m.split(".")[:2]) for m in sys.modules
                         if m.startswith(("torch.onnx", "torch._dynamo", "onnxscript"))})))
"""


def test_the_default_backbones_are_written_without_the_exporter(tmp_path):
    """PyTorch's exporter (about 190 MB of modules in the export's process) is never loaded for the
    image, audio, video and series backbones."""
    out = subprocess.run([sys.executable, "-c", WRITTEN_EXPORT, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
