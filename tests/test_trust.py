"""Issue #9, parts D-E: signed packs, the malicious-pack corpus, bounded packs, a watcher that cannot be wedged."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mmcl_edge.runtime import PackRejected, Runtime
from mmcl_edge.runtime import layout
from mmcl_edge.runtime.pack import pack_digest, sha256_file
from mmcl_edge.runtime.trust import new_keypair, sign_pack


@pytest.fixture(scope="module")
def signed(tmp_path_factory, synthetic_ws):
    """A copy of the synthetic workspace with a signing key; v0003 and v0004 signed (task 2 republished)."""
    from mmcl_edge.export.pack_export import publish_pack
    from mmcl_edge.workspace import Workspace

    base = tmp_path_factory.mktemp("signed")
    root = base / "ws"
    shutil.copytree(synthetic_ws.root, root)
    private, public = new_keypair(root / "keys")
    ws = Workspace.open(root)
    model = ws.load_model(2)
    publish_pack(ws, 2, model)  # v0003
    publish_pack(ws, 2, model)  # v0004, current
    return root, private, public


def inputs_of(synthetic_ws):
    sc = synthetic_ws.scenario()
    return {m: np.stack(sc.test.samples[m][:4]) for m in sc.specs}


def finalize(folder: Path, manifest: dict, key: Path | None):
    """Re-hash every listed file and the manifest, re-sign: internally consistent, as an attacker would."""
    manifest["files"] = {n: sha256_file(folder / n) for n in manifest["files"]}
    manifest["sha256"] = pack_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "signature.json").unlink(missing_ok=True)
    if key is not None:
        sign_pack(folder, manifest, key)


def loop_graph(input_names_shapes, n_classes, width, trips=10 ** 12, fused_width=None):
    """A graph with the pack's inputs and outputs whose value depends on a Loop of ``trips`` iterations."""
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "one"], ["acc_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    name, tokens, dim = input_names_shapes[0]
    nodes = [helper.make_node("Constant", [], ["M"], value=helper.make_tensor("M", TensorProto.INT64, [], [trips])),
             helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
             helper.make_node("Constant", [], ["z"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("Loop", ["M", "c", "z"], ["acc"], body=body),
             helper.make_node("ReduceMean", [name, "ax"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "wl"], ["l0"]), helper.make_node("Add", ["l0", "acc"], ["logits"]),
             helper.make_node("MatMul", ["pooled", "wf"], ["f0"]), helper.make_node("Add", ["f0", "acc"], ["fused"])]
    fw = fused_width or width
    inits = [helper.make_tensor("ax", TensorProto.INT64, [1], [1]),
             helper.make_tensor("wl", TensorProto.FLOAT, [dim, n_classes], [0.0] * (dim * n_classes)),
             helper.make_tensor("wf", TensorProto.FLOAT, [dim, width], [0.0] * (dim * width))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", t, d])
                                       for n, t, d in input_names_shapes],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes]),
                           helper.make_tensor_value_info("fused", TensorProto.FLOAT, ["batch", fw])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def huge_fused_graph(input_names_shapes, n_classes, fused_width=1 << 27):
    """Allowed ops only, but 'fused' is [batch, 2^27] floats: 0.5 GB per sample."""
    name, tokens, dim = input_names_shapes[0]
    nodes = [helper.make_node("ReduceMean", [name, "ax"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "wl"], ["logits"]),
             helper.make_node("ReduceSum", ["pooled", "ax"], ["s"], keepdims=1),
             helper.make_node("Expand", ["s", "shp"], ["fused"])]
    inits = [helper.make_tensor("ax", TensorProto.INT64, [1], [1]),
             helper.make_tensor("wl", TensorProto.FLOAT, [dim, n_classes], [0.0] * (dim * n_classes)),
             helper.make_tensor("shp", TensorProto.INT64, [2], [1, fused_width])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", t, d])
                                       for n, t, d in input_names_shapes],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes]),
                           helper.make_tensor_value_info("fused", TensorProto.FLOAT, ["batch", fused_width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def spoil(src: Path, dst: Path, kind: str, key: Path) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    if kind == "permuted-labels":
        manifest["label_names"] = list(reversed(manifest["label_names"]))
        finalize(dst, manifest, None)
        shutil.copy(src / "signature.json", dst / "signature.json")  # the old signature, over another manifest
    elif kind == "forged-version":
        manifest["version"] = 99999
        finalize(dst, manifest, None)
    elif kind == "unsigned":
        finalize(dst, manifest, None)
    elif kind == "other-workspace":
        manifest["workspace_id"], manifest["scenario"] = "f" * 32, "someone-elses"
        finalize(dst, manifest, key)  # even properly signed by our key
    elif kind == "unlisted-file":
        (dst / "notes.txt").write_text("hello")
    elif kind == "symlink-onnx":
        outside = dst.parent / f"{dst.name}-outside.onnx"
        shutil.copy(dst / "pack.onnx", outside)
        (dst / "pack.onnx").unlink()
        os.symlink(outside, dst / "pack.onnx")
    elif kind == "external-data":
        model = onnx.load(str(dst / "pack.onnx"))
        onnx.save_model(model, str(dst / "pack.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)
        manifest["files"]["weights.bin"] = ""
        finalize(dst, manifest, key)
    elif kind == "pickle-weights":
        (dst / "weights.safetensors").write_bytes(pickle.dumps({"x": os.system}))
        manifest["files"]["weights.safetensors"] = ""  # listed, as packs before 0.3 listed it
        finalize(dst, manifest, key)
    elif kind in ("loop-graph", "huge-fused"):
        shapes = [(i["name"], i["shape"][1], i["shape"][2]) for i in manifest["inputs"]]
        n, width = len(manifest["classes"]), manifest["outputs"]["fused"][1]
        model = loop_graph(shapes, n, width) if kind == "loop-graph" else huge_fused_graph(shapes, n)
        onnx.save_model(model, str(dst / "pack.onnx"))
        finalize(dst, manifest, key)
    else:
        raise ValueError(kind)
    return dst


CORPUS = {
    "permuted-labels": "changed after signing",
    "forged-version": "not signed",
    "unsigned": "not signed",
    "other-workspace": "belongs to workspace",
    "unlisted-file": "not listed in the manifest",
    "symlink-onnx": "symbolic link",
    "external-data": "external data",
    "pickle-weights": "not a safetensors file",
    "loop-graph": "allow-list: Loop",
    "huge-fused": "declares \\[batch, 128\\]",
}


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_malicious_pack_is_refused_and_previous_pack_keeps_serving(signed, synthetic_ws, tmp_path, kind):
    root, private, public = signed
    rt = Runtime(root, providers="cpu", trusted_keys=[public])
    assert rt.pack.version == 4 and rt.authenticated
    before = rt.predict(inputs_of(synthetic_ws))
    bad = spoil(root / "packs" / "v0004", tmp_path / f"bad-{kind}", kind, private)
    with pytest.raises(PackRejected, match=CORPUS[kind]):
        rt.swap(bad)
    assert rt.pack.version == 4
    np.testing.assert_array_equal(rt.predict(inputs_of(synthetic_ws)).probabilities, before.probabilities)


def test_a_swapped_backbone_fails_the_signed_pack(signed, tmp_path):
    """A pack names the sha256 of the backbone files it was made for, under its signature: a backbone
    replaced along with its entry in backbones.json (what a follower's link could do) is caught."""
    root, _, public = signed
    copy = tmp_path / "ws"
    shutil.copytree(root, copy)
    index_file = copy / "backbones" / "backbones.json"
    index = json.loads(index_file.read_text())
    modality, entry = next(iter(index["modalities"].items()))
    onnx_file = copy / "backbones" / entry["file"]
    model = onnx.load(str(onnx_file))
    model.doc_string = "another file"  # any change of the bytes: the runtime cannot judge what a graph means
    onnx.save(model, str(onnx_file))
    entry["sha256"] = sha256_file(onnx_file)
    index_file.write_text(json.dumps(index))
    with pytest.raises(PackRejected, match="backbone files"):
        Runtime(copy, providers="cpu", trusted_keys=[public])


def test_rollback_is_refused_unless_allowed(signed):
    root, _, public = signed
    rt = Runtime(root, providers="cpu", trusted_keys=[public])
    with pytest.raises(PackRejected, match="rollback"):
        rt.swap("v0003")
    with pytest.raises(PackRejected, match="not signed"):
        rt.swap("v0000")
    assert rt.pack.version == 4
    rt2 = Runtime(root, providers="cpu", trusted_keys=[public], allow_downgrade=True)
    assert rt2.swap("v0003").version == 3


def test_without_keys_packs_behave_as_before_and_info_says_so(signed, tmp_path):
    from typer.testing import CliRunner

    from mmcl_edge.cli.main import app

    root, private, _ = signed
    rt = Runtime(root, providers="cpu")
    assert not rt.authenticated
    assert rt.swap("v0000").version == 0  # no keys: unsigned and older packs are served as today
    r = CliRunner().invoke(app, ["info", "-w", str(root)])
    assert r.exit_code == 0 and "packs are signed" in r.output
    plain = tmp_path / "plain"
    shutil.copytree(root, plain, ignore=shutil.ignore_patterns("keys", "v0003", "v0004"))
    layout.set_current(plain, "v0002")
    r = CliRunner().invoke(app, ["info", "-w", str(plain)])
    assert r.exit_code == 0 and "not authenticated" in r.output


def test_keys_new_writes_a_private_key_only_its_owner_reads(tmp_path):
    from typer.testing import CliRunner

    from mmcl_edge.cli.main import app

    r = CliRunner().invoke(app, ["keys", "new", "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "k" / "signing.key").stat().st_mode) == 0o600
    assert (tmp_path / "k" / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    r = CliRunner().invoke(app, ["keys", "new", "--out", str(tmp_path / "k")])
    assert r.exit_code == 2 and "never overwritten" in r.output


@pytest.mark.parametrize("bad", ["../../etc", "/etc/passwd", "v0002/../../.."])
def test_current_with_a_path_is_refused(signed, tmp_path, bad):
    root, _, _ = signed
    ws = tmp_path / "ws"
    shutil.copytree(root, ws)
    (ws / "current").write_text(bad + "\n")
    with pytest.raises(PackRejected, match="directly inside"):
        Runtime(ws, providers="cpu")
    rt = Runtime(ws, providers="cpu", pack="v0004")
    rt.start_watcher(0.02)
    layout.set_current(ws, "v0002")  # a good pointer after the bad one is followed
    for _ in range(500):
        if rt.pack.version == 2:
            break
        import time
        time.sleep(0.02)
    (ws / "current").write_text(bad)
    assert rt.stop()
    assert rt.pack.version == 2


def test_runaway_warm_up_is_stopped_and_the_watcher_stops(signed, tmp_path):
    """Even with the allow-list switched off, a Loop of 10^12 iterations cannot wedge the runtime."""
    root, private, public = signed
    ws = tmp_path / "ws"
    shutil.copytree(root, ws)
    rt = Runtime(ws, providers="cpu", allowed_ops=None, warmup_seconds=1.0)
    spoil(ws / "packs" / "v0004", ws / "packs" / "v0005", "loop-graph", private)
    with pytest.raises(PackRejected, match="did not finish within 1 s"):
        rt.swap("v0005")
    assert rt.pack.version == 4
    rt.start_watcher(0.02)
    layout.set_current(ws, "v0005")
    import time
    for _ in range(500):
        if len(rt.rejections) >= 2:
            break
        time.sleep(0.02)
    assert "did not finish" in rt.rejections[-1].reason
    assert rt.stop() and rt._watcher is None
    assert rt.pack.version == 4


def test_pack_ops_are_within_the_allow_list(synthetic_ws):
    from mmcl_edge.runtime.graph_check import ALLOWED_OPS, check_graph_file

    for p in sorted((synthetic_ws.root / "packs").glob("v*")):
        ops = set()
        from mmcl_edge.runtime.graph_check import check_graph_bytes
        ops = check_graph_bytes((p / "pack.onnx").read_bytes())
        assert ops <= ALLOWED_OPS and "Loop" not in ops
        check_graph_file(p / "pack.onnx")


def test_graph_check_refuses_damaged_bytes_in_plain_words(synthetic_ws):
    """Any truncation or byte flip of a real pack graph is either still a graph the check reads
    (then its operators are reported) or a PackRejected; never another exception."""
    from mmcl_edge.runtime.graph_check import check_graph_bytes

    data = (sorted((synthetic_ws.root / "packs").glob("v*"))[-1] / "pack.onnx").read_bytes()
    rng = np.random.default_rng(0)
    rejected = 0
    cuts = list(range(1, 64)) + list(rng.integers(64, len(data), 200))
    flips = []
    for _ in range(300):
        damaged = bytearray(data)
        for at in rng.integers(0, len(data), 3):
            damaged[at] = int(rng.integers(0, 256))
        flips.append(bytes(damaged))
    for bad in [data[:int(c)] for c in cuts] + flips:
        try:
            check_graph_bytes(bad)
        except PackRejected:
            rejected += 1
    assert rejected >= len(cuts) // 2  # most cuts leave no whole graph
