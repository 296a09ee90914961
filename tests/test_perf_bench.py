"""Edge costs: the lean pack (one float16 copy of the weights), FLOP counting, and the latency and
swap benchmarks' JSON (documented keys, numbers that add up). No timing assertions: the targets
are checked by the bench commands on the device, not here."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from mmcl_edge.cli.main import app
from mmcl_edge.export.flops import count_flops

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_flops_of_a_known_graph(tmp_path):
    """Conv 3->8, 3x3, stride 1, pad 1 on 10x10, then MatMul 800->5: 2 * (8*10*10*3*3*3 + 800*5) per sample."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    m = numpy_helper.from_array(rng.standard_normal((800, 5)).astype(np.float32), "m")
    shape = numpy_helper.from_array(np.array([-1, 800], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["c", "shape"], ["r"]),
         helper.make_node("MatMul", ["r", "m"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], [w, m, shape])
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    r = count_flops(path)
    assert r["uncounted"] == []
    assert r["by_op"] == {"Conv": 2.0 * 8 * 10 * 10 * 3 * 3 * 3, "MatMul": 2.0 * 800 * 5}
    assert count_flops(path, batch=4)["flops"] == r["flops"]  # per sample, whatever the batch


def test_pack_holds_one_float16_copy_of_its_weights(synthetic_ws):
    pack = synthetic_ws.root / "packs" / (synthetic_ws.root / "current").read_text().strip()
    manifest = json.loads((pack / "manifest.json").read_text())
    assert sorted(p.name for p in pack.iterdir()) == ["manifest.json", "pack.onnx"]
    assert list(manifest["files"]) == ["pack.onnx"]
    model = onnx.load(str(pack / "pack.onnx"))
    halves = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    w = manifest["weights"]
    assert halves
    # float32 only for what the model keeps so: biases and norms (small tensors, stacked or not)
    assert sum(4 * int(np.prod(t.dims)) for t in floats) < 0.1 * w["weights_bytes_stored"]
    assert w["stored"] == "float16" and w["weights_bytes_stored"] < 0.55 * w["weights_bytes_fp32"]
    assert (pack / "pack.onnx").stat().st_size < w["weights_bytes_stored"] + 200_000  # the graph beside them is small


def test_model_description_without_tap_rank_is_a_full_rank_model():
    """States saved before 0.3 have no tap_rank: they load with full-rank projections, as trained."""
    from mmcl_edge.backbones import TapSpec
    from mmcl_edge.config import EncoderConfig
    from mmcl_edge.model import MMCLModel

    taps = {"a": (TapSpec("t", 4, 64),), "b": (TapSpec("t", 2, 16),)}
    model = MMCLModel(taps, EncoderConfig(tap_rank=0), "class-il", head_blocks=[2])
    d = model.describe()
    del d["encoder"]["tap_rank"]
    again = MMCLModel.from_description(d)
    again.load_state_dict(model.state_dict())  # same parameters, same shapes
    assert again.encoder.proj[0][0].reduce is None
    lean = MMCLModel(taps, EncoderConfig(tap_rank=8), "class-il", head_blocks=[2])
    assert lean.encoder.proj[0][0].reduce.weight.shape == (8, 64)
    assert sum(p.numel() for p in lean.encoder.proj.parameters()) < sum(p.numel() for p in model.encoder.proj.parameters())


def test_bench_latency_json_keys_and_consistency(synthetic_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, ws)
    out = tmp_path / "lat.json"
    r = invoke("bench", "latency", "-w", ws, "--batch", 1, "--batch", 4, "--repeats", 5, "--threads", 1, "--out", out)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert set(d["batches"]) == {"1", "4"}
    for entry in d["batches"].values():
        assert set(entry["stages_ms"]) == {"preprocess", "backbone", "pack", "total"}
        assert 0 < entry["stages_ms"]["total"]["p50"] <= entry["stages_ms"]["total"]["p99"]
        assert entry["throughput_samples_per_s"] > 0
    assert d["swap_ms"]["p50"] > 0 and d["pack_providers"] == ["CPUExecutionProvider"]
    e = d["batches"]["1"]
    st = e["stages_ms"]
    # the stages of one request add up to its total (means are additive; noise of the timer only)
    assert st["preprocess"]["mean"] + st["backbone"]["mean"] + st["pack"]["mean"] <= st["total"]["mean"] * 1.02 + 0.05
    assert e["pack_over_backbone"] == pytest.approx(st["pack"]["p50"] / st["backbone"]["p50"])
    assert set(e["bare_backbone_ms"]) == set(d["backbone_bytes"]) == set(d["backbone_flops"])
    assert e["bare_backbones_p50_ms"] == pytest.approx(sum(p["p50"] for p in e["bare_backbone_ms"].values()))
    assert e["total_over_bare_backbones"] == pytest.approx(e["end_to_end_ms"]["p50"] / e["bare_backbones_p50_ms"])
    assert e["end_to_end_ms"]["mean"] >= st["total"]["mean"]  # the caller also waits for the answer to be built
    assert set(e["runtime_session_backbone_ms"]) == set(e["bare_backbone_ms"])
    assert e["runtime_session_backbones_p50_ms"] == pytest.approx(
        sum(p["p50"] for p in e["runtime_session_backbone_ms"].values()))
    assert set(e["bare_no_spin_backbone_ms"]) == set(e["bare_backbone_ms"])  # issue #19's own reference
    assert e["total_over_bare_no_spin_backbones"] == pytest.approx(
        e["end_to_end_ms"]["p50"] / sum(p["p50"] for p in e["bare_no_spin_backbone_ms"].values()))
    assert "spinning off" in d["bare_no_spin"]
    assert e["p99_over_p50"]["total"] == pytest.approx(st["total"]["p99"] / st["total"]["p50"])
    # a request = preprocessing + time inside onnxruntime + the runtime's Python: means add up
    assert e["python_overhead_ms"]["mean"] == pytest.approx(
        e["end_to_end_ms"]["mean"] - st["preprocess"]["mean"] - e["sessions_ms"]["mean"], abs=1e-6)
    assert 0 < e["sessions_ms"]["mean"] <= st["backbone"]["mean"] + st["pack"]["mean"] + 0.05
    assert e["python_overhead_ms"]["p50"] > 0
    assert len(d["loadavg"]) == 3 and "InferenceSession" in d["bare"]
    for m, g in e["backbone_gflops_per_s"].items():
        assert g == pytest.approx(d["backbone_flops"][m] / (e["bare_backbone_ms"][m]["p50"] * 1e-3) / 1e9)
    eager = e["pytorch_eager_ms"]
    assert e["speedup_vs_eager"]["total"] == pytest.approx(eager["total"]["p50"] / st["total"]["p50"])
    assert d["reference_gflops"] > 0
    mem = d["runtime_memory_mb"]
    assert 0 < mem["rss_mb"] <= mem["peak_rss_mb"] and mem["torch_loaded"] is False
    assert d["pack_kb"] == sum(d["pack_bytes"].values()) // 1024
    assert "GFLOP/s" in r.output and "resident" in r.output and "Python overhead" in r.output


def test_bench_swap_under_load(synthetic_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, ws)
    out = tmp_path / "swap.json"
    r = invoke("bench", "swap", "-w", ws, "--threads", 2, "--swaps", 20, "--baseline-seconds", 0.5,
               "--session-threads", 1, "--out", out)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["swaps_done"] + d["swaps_rejected"] == 20 and d["swaps_rejected"] == 0
    assert d["failed_requests"] == 0 and d["answers_from_other_packs"] == 0 and d["failures"] == []
    assert d["requests"]["baseline"] > 0 and d["requests"]["swapping"] > 0
    parts = d["swap_parts_ms"]
    assert set(parts) == {"verify", "session", "warmup", "switch"}
    # the parts of a swap add up to no more than the whole (plus timer noise)
    assert sum(p["mean"] for p in parts.values()) <= d["swap_ms"]["mean"] * 1.02 + 0.05
    assert d["request_p99_ratio"] == pytest.approx(d["request_ms"]["swapping"]["p99"] / d["request_ms"]["baseline"]["p99"])
    assert "Hot swap" in r.output


def test_bench_swap_needs_two_packs(tmp_path, synthetic_ws):
    ws = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, ws)
    for p in sorted((ws / "packs").glob("v*"))[:-1]:
        shutil.rmtree(p)
    r = invoke("bench", "swap", "-w", ws, "--swaps", 2, "--out", tmp_path / "x.json")
    assert r.exit_code == 2 and "needs two" in r.output and "Traceback" not in r.output


def test_workspace_from_before_tap_rank_keeps_full_rank(tmp_path, synthetic_ws):
    """A workspace.json written before 0.3 has no encoder.tap_rank: it keeps full-rank projections,
    so its saved states (and the tasks still to learn) match."""
    from mmcl_edge.workspace import Workspace

    ws = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, ws)
    meta = json.loads((ws / "workspace.json").read_text())
    assert meta["config"]["encoder"]["tap_rank"] == 32  # today's default, recorded
    del meta["config"]["encoder"]["tap_rank"]
    (ws / "workspace.json").write_text(json.dumps(meta))
    assert Workspace.open(ws).config.encoder.tap_rank == 0


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc and glibc's malloc_trim")
def test_release_returns_freed_heap_to_the_system():
    """What the learner calls between a task's stages: memory freed in small blocks stays resident in
    glibc's heap until ``release`` trims it."""
    from mmcl_edge.runtime.memory import _libc_function, release, rss_mb

    if _libc_function("malloc_trim") is None:
        pytest.skip("no malloc_trim (not glibc)")
    release()
    blocks = [np.ones(8192) for _ in range(4000)]  # 64 KB each, below glibc's mmap threshold: 256 MB of heap
    held = rss_mb()
    del blocks[::2]  # holes between live blocks: glibc keeps them until trimmed
    after = release()
    assert after < held - 80
    del blocks


def test_serve_spinning_is_off_unless_asked(synthetic_ws, monkeypatch):
    """Idle onnxruntime threads sleep by default (they would steal a small CPU's cores from a learner);
    MMCL_EDGE_SERVE_SPIN=run spins inside a run only, =1 (always) as onnxruntime does; a typo is an error."""
    from mmcl_edge.runtime.errors import RuntimeUserError
    from mmcl_edge.runtime.providers import session

    backbone = sorted((synthetic_ws.root / "backbones").glob("*.onnx"))[0]
    for value, spin, stop in ((None, "0", ""), ("1", "1", ""), ("always", "1", ""), ("0", "0", ""),
                              ("run", "1", "1")):
        if value is None:
            monkeypatch.delenv("MMCL_EDGE_SERVE_SPIN", raising=False)
        else:
            monkeypatch.setenv("MMCL_EDGE_SERVE_SPIN", value)
        opts = session(backbone, ["CPUExecutionProvider"]).get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == spin
        assert (opts.get_session_config_entry("session.force_spinning_stop") if stop else "") == stop
    monkeypatch.setenv("MMCL_EDGE_SERVE_SPIN", "sometimes")
    with pytest.raises(RuntimeUserError, match="MMCL_EDGE_SERVE_SPIN"):
        session(backbone, ["CPUExecutionProvider"])