"""Lower-precision backbones (``mmcl-edge export --precision``): parity, identities, refusal, restore.

The flow tests run on copies of the synthetic workspace (identity backbones: seconds); the parity
test quantises the real EfficientNet-Lite0 backbones of AV-Digits (read-only, into tmp_path).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from mmcl_edge.cli.main import app
from mmcl_edge.export import quantize as q
from mmcl_edge.export.backbone_export import ensure_backbones, read_index, verify_index
from mmcl_edge.preprocess import preprocess_batch
from mmcl_edge.runtime import PackRejected, Runtime, layout
from mmcl_edge.runtime.pack import sha256_file
from mmcl_edge.workspace import Workspace

runner = CliRunner()


@pytest.fixture
def ws(synthetic_ws, tmp_path):
    """A private copy of the synthetic workspace (three tasks, packs v0000..v0002, FP32)."""
    root = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, root, ignore=shutil.ignore_patterns(".lock*"))
    return Workspace.open(root)


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".lock")}


def zeroing_converter(src, dst, *_args, **_kw):
    """A conversion that destroys the taps (x * 0): the accuracy check must refuse it."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    for node in g.node:
        node.input[:] = ["x_zeroed" if i == "x" else i for i in node.input]
    g.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    g.node.insert(0, helper.make_node("Mul", ["x", "zero"], ["x_zeroed"]))
    onnx.save(model, str(dst))


def test_int8_backbones_keep_parity_with_fp32(avdigits_ws, tmp_path):
    """INT8 EfficientNet-Lite0 (AV-Digits, 96 px) against FP32 on the whole test split.

    Measured (onnxruntime 1.32, x86, 64 calibration samples): per tap the mean cosine to the FP32
    taps is 0.96-0.99, the worst single sample 0.84 (image head); the pack's predictions agree on
    99.7% of the samples and lose 0.33 accuracy points. Tolerances, with margin: mean cosine
    >= 0.93 per tap, worst sample >= 0.6, predictions agree on >= 97%, accuracy drop <= 2 points.
    """
    sc = avdigits_ws.scenario()
    folder = avdigits_ws.root / "backbones"
    entries = read_index(folder)["modalities"]
    task = avdigits_ws.learned_tasks() - 1
    test_idx = q._test_indices(sc, task)
    calib_idx = q.spread_indices(sc.train.y, q.CALIBRATION_SAMPLES)
    assert len(set(sc.train.y[calib_idx])) == sc.num_classes  # every class calibrates
    ref, new = {}, {}
    for m, e in entries.items():
        dst = tmp_path / q.served_file(m, "int8")
        q.quantize_int8(folder / e["file"], dst, preprocess_batch([sc.train.samples[m][i] for i in calib_idx],
                                                                  sc.specs[m]), e["input"])
        x = preprocess_batch([sc.test.samples[m][i] for i in test_idx], sc.specs[m])
        names = [t["name"] for t in e["taps"]]
        a = q.run_taps(q.session(folder / e["file"], 1), e["input"], x)
        b = q.run_taps(q.session(dst, 1), e["input"], x)
        parity = q.tap_parity(a, b, names)
        for name, t in parity["taps"].items():
            assert t["cosine"] >= 0.93 and t["cosine_min"] >= 0.6, (m, name, t)
        ref.update({f"{m}__{n}": t for n, t in zip(names, a)})
        new.update({f"{m}__{n}": t for n, t in zip(names, b)})
    acc = q.pack_accuracy(layout.current_folder(avdigits_ws.root), entries, ref, new, sc.test.y[test_idx], "int8", 1)
    assert acc["agreement"] >= 97.0, acc
    assert acc["fp32"] - acc["int8"] <= 2.0, acc


def test_int8_changes_identity_and_old_fp32_pack_is_rejected(ws):
    folder = ws.root / "backbones"
    before = read_index(folder)["modalities"]
    with ws.lock("export"):
        report = q.change_precision(ws, "int8", threads=1, repeats=3)
    assert report.changed and report.pack == "v0003"
    assert report.accuracy["fp32"] - report.accuracy["int8"] <= 1.0
    after = read_index(folder)["modalities"]
    assert verify_index(folder) == []
    for m, e in after.items():
        assert e["identity"] == before[m]["identity"] + "-int8" and e["base_identity"] == before[m]["identity"]
        assert e["precision"] == "int8" and e["file"] == f"{m}.int8.onnx" and (folder / f"{m}.onnx").is_file()
        assert e["quantization"]["parity"]["cosine_min"] >= 0.99  # identity backbones: nothing to lose
        assert {"ms_fp32", "ms_int8", "speedup", "accuracy"} <= set(e["quantization"])
    manifest = json.loads((ws.root / "packs" / "v0003" / "manifest.json").read_text())
    assert manifest["backbones"] == {m: e["identity"] for m, e in after.items()}
    rt = Runtime(ws.root, providers="cpu", threads=1)
    assert rt.pack.version == 3
    sc = ws.scenario()
    assert len(rt.predict({m: sc.test.samples[m][:4] for m in sc.specs}).labels) == 4
    with pytest.raises(PackRejected, match="trained against backbones"):
        rt.swap("v0002")  # learned and published on FP32 taps
    # the precision survives what learn and export run: ensure_backbones keeps it (even forced,
    # the weights being unchanged) and a pack published afterwards carries the INT8 identities
    src = ws.tap_source()
    assert ensure_backbones(folder, src.backbones, sc.specs)["modalities"] == after
    forced = ensure_backbones(folder, src.backbones, sc.specs, force=True)["modalities"]
    assert {m: (e["identity"], e["file"], e["sha256"]) for m, e in forced.items()} == \
           {m: (e["identity"], e["file"], e["sha256"]) for m, e in after.items()}
    # asking again changes nothing
    with ws.lock("export"):
        assert not q.change_precision(ws, "int8", threads=1).changed


def test_fp32_restores(ws):
    folder = ws.root / "backbones"
    before = read_index(folder)["modalities"]
    with ws.lock("export"):
        q.change_precision(ws, "int8", threads=1, repeats=3)
        report = q.change_precision(ws, "fp32", threads=1)
    assert report.changed and report.pack == "v0004"
    after = read_index(folder)["modalities"]
    for m, e in after.items():
        assert (e["identity"], e["file"], e["sha256"]) == (before[m]["identity"], before[m]["file"], before[m]["sha256"])
        assert e["precision"] == "fp32" and "quantization" not in e
        assert not (folder / f"{m}.int8.onnx").exists()
    rt = Runtime(ws.root, providers="cpu", threads=1)
    assert rt.pack.version == 4
    rt.swap("v0002")  # the old FP32 pack fits again
    with pytest.raises(PackRejected):
        rt.swap("v0003")  # the INT8 one does not


def test_fp16_converts_and_keeps_parity(ws):
    with ws.lock("export"):
        report = q.change_precision(ws, "fp16", threads=1, repeats=3)
    for m, e in read_index(ws.root / "backbones")["modalities"].items():
        assert e["identity"].endswith("-fp16") and e["file"] == f"{m}.fp16.onnx"
        assert report.modalities[m]["parity"]["cosine_min"] >= 0.999
    assert report.accuracy["agreement"] >= 99.0


def test_refused_drop_leaves_the_workspace_unchanged(ws, monkeypatch):
    monkeypatch.setattr(q, "quantize_int8", zeroing_converter)
    before = snapshot(ws.root)
    r = runner.invoke(app, ["export", "-w", str(ws.root), "--precision", "int8", "--threads", "1", "--no-tensorrt"])
    assert r.exit_code == 2, r.output
    assert "error: INT8 backbones lose" in r.output and "nothing was changed" in r.output
    assert "Traceback" not in r.output
    assert snapshot(ws.root) == before
    # --force accepts the drop
    with ws.lock("export"):
        report = q.change_precision(ws, "int8", force=True, threads=1, repeats=3)
    assert report.changed and report.accuracy["fp32"] - report.accuracy["int8"] > 1.0


def test_cli_export_precision_int8(ws):
    r = runner.invoke(app, ["export", "-w", str(ws.root), "--precision", "int8", "--threads", "1", "--no-tensorrt"])
    assert r.exit_code == 0, r.output
    assert "int8 vs fp32" in r.output and "speed-up" in r.output
    assert "accuracy on" in r.output and "published v0003" in r.output
    r = runner.invoke(app, ["export", "-w", str(ws.root), "--no-tensorrt"])  # the precision stays
    assert r.exit_code == 0, r.output
    assert all(e["precision"] == "int8" for e in read_index(ws.root / "backbones")["modalities"].values())
    r = runner.invoke(app, ["export", "-w", str(ws.root), "--precision", "int4"])
    assert r.exit_code == 2 and "precision 'int4' is not one of" in r.output


def test_int8_conv_net_parity_without_data(tmp_path):
    """INT8 parity that needs no data set: a small conv net (3x3 conv, ReLU, 3x3 conv, global mean:
    the shape of a backbone tap) quantised with the same function as ``export --precision int8``,
    calibrated on 32 inputs and checked on 64 others. Tolerance: per-sample cosine similarity of the
    tap >= 0.98 (8-bit weights per channel and activations keep ~2 significant digits; measured
    0.9999) and the quantised graph really holds integer (QDQ) operators."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mmcl_edge.export.quantize import quantize_int8, session

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32), "w2")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("ReduceMean", ["c2", "axes"], ["tap"], keepdims=0)],
        "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("tap", TensorProto.FLOAT, ["batch", 32])], [w1, w2, axes])
    src, dst = tmp_path / "net.onnx", tmp_path / "net.int8.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(src))
    x = rng.standard_normal((96, 3, 16, 16)).astype(np.float32)
    quantize_int8(src, dst, x[:32], "x")
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    ref = session(src).run(None, {"x": x[32:]})[0]
    got = session(dst).run(None, {"x": x[32:]})[0]
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() >= 0.98, cos.min()


def test_one_modality_in_int8_and_the_others_as_they_serve(ws, monkeypatch):
    """Per-modality precision: a conversion that destroys one modality's taps is refused with the
    culprit named (each modality alone measured); converting only the others serves a mix, and the
    pack carries each backbone's own identity."""
    folder = ws.root / "backbones"
    before = read_index(folder)["modalities"]
    bad, good = sorted(before)[:2]
    real = q.quantize_int8

    def destroys_one(src, dst, *args, **kw):
        return (zeroing_converter if f"{bad}.int8.onnx" in str(dst) else real)(src, dst, *args, **kw)

    monkeypatch.setattr(q, "quantize_int8", destroys_one)
    snap = snapshot(ws.root)
    with ws.lock("export"), pytest.raises(Exception, match=f"alone, {bad} loses .*--modality {good}") as refused:
        q.change_precision(ws, "int8", threads=1, repeats=3)
    assert "nothing was changed" in str(refused.value) and snapshot(ws.root) == snap
    with ws.lock("export"):
        report = q.change_precision(ws, "int8", threads=1, repeats=3, modalities=[good])
    assert report.changed and set(report.modalities) == {good}
    assert report.accuracy["fp32"] - report.accuracy["int8"] <= 1.0
    after = read_index(folder)["modalities"]
    assert after[bad] == before[bad] and after[good]["identity"] == before[good]["identity"] + "-int8"
    manifest = json.loads((ws.root / "packs" / report.pack / "manifest.json").read_text())
    assert manifest["backbones"] == {m: e["identity"] for m, e in after.items()}
    rt = Runtime(ws.root, providers="cpu", threads=1)
    sc = ws.scenario()
    assert len(rt.predict({m: sc.test.samples[m][:3] for m in sc.specs}).labels) == 3
    with ws.lock("export"):  # the other one already serves INT8: nothing to do for it
        assert not q.change_precision(ws, "int8", threads=1, modalities=[good]).changed
        with pytest.raises(Exception, match="no backbone for modality nope"):
            q.change_precision(ws, "int8", threads=1, modalities=["nope"])
