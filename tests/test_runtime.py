"""The torch-free runtime: pack validation, thread-safe hot-swap, and no torch in the process."""
from __future__ import annotations

import json
import shutil
import subprocess
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mmcl_edge.runtime import InputError, PackRejected, Runtime, RuntimeUserError
from mmcl_edge.runtime.pack import pack_digest


def packs_of(ws) -> list[Path]:
    return sorted((ws.root / "packs").glob("v[0-9]*"))


def sample_inputs(synthetic_ws):
    return {m: np.stack(synthetic_ws.scenario().test.samples[m][:8]) for m in synthetic_ws.scenario().specs}


def bad_pack(src: Path, dst: Path, kind: str) -> Path:
    """A copy of a good pack, spoiled in one way."""
    shutil.copytree(src, dst)
    manifest_path = dst / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if kind == "corrupt-manifest":
        manifest_path.write_text("{ this is not json")
    elif kind == "other-backbones":
        manifest["backbones"] = {m: "0123456789abcdef" for m in manifest["backbones"]}
        manifest["sha256"] = pack_digest(manifest)  # internally consistent: only the backbones differ
        manifest_path.write_text(json.dumps(manifest))
    elif kind == "truncated-onnx":
        data = (dst / "pack.onnx").read_bytes()
        (dst / "pack.onnx").write_bytes(data[: len(data) // 2])
    elif kind == "truncated-onnx-rehashed":  # hashes recomputed: only onnxruntime can notice
        from mmcl_edge.runtime.pack import sha256_file

        data = (dst / "pack.onnx").read_bytes()
        (dst / "pack.onnx").write_bytes(data[: len(data) // 2])
        manifest["files"]["pack.onnx"] = sha256_file(dst / "pack.onnx")
        manifest["sha256"] = pack_digest(manifest)
        manifest_path.write_text(json.dumps(manifest))
    elif kind == "missing-field":
        del manifest["classes"]
        manifest_path.write_text(json.dumps(manifest))
    elif kind == "edited-manifest":
        manifest["label_names"] = list(reversed(manifest["label_names"]))
        manifest_path.write_text(json.dumps(manifest))
    elif kind == "wrong-inputs":
        manifest["inputs"] = manifest["inputs"][:1]
        manifest["sha256"] = pack_digest(manifest)
        manifest_path.write_text(json.dumps(manifest))
    else:
        raise ValueError(kind)
    return dst


BAD_KINDS = ["corrupt-manifest", "other-backbones", "truncated-onnx", "truncated-onnx-rehashed", "missing-field",
             "edited-manifest", "wrong-inputs"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_pack_is_rejected_and_old_pack_keeps_serving(synthetic_ws, tmp_path, kind):
    rt = Runtime(synthetic_ws.root, providers="cpu")
    serving = rt.pack.version
    before = rt.predict(sample_inputs(synthetic_ws))
    spoiled = bad_pack(packs_of(synthetic_ws)[0], tmp_path / kind, kind)
    with pytest.raises(PackRejected):
        rt.swap(spoiled)
    assert rt.pack.version == serving
    assert rt.rejections and rt.rejections[-1].pack == str(spoiled)
    after = rt.predict(sample_inputs(synthetic_ws))
    np.testing.assert_array_equal(before.probabilities, after.probabilities)


def test_pack_with_non_finite_outputs_is_rejected(synthetic_ws, tmp_path):
    """A manifest-consistent pack whose weights are NaN fails the warm-up inference."""
    import torch

    from mmcl_edge.export.pack_export import export_pack

    ws = synthetic_ws
    model = ws.load_model(0)
    with torch.no_grad():
        model.analytic.weight.fill_(float("nan"))
    good = json.loads((packs_of(ws)[0] / "manifest.json").read_text())
    export_pack(model, tmp_path / "nan", version=99, task=0, classes=good["classes"], label_names=good["label_names"],
                setting=good["setting"], preprocess=good["preprocess"], backbones=good["backbones"])
    rt = Runtime(ws.root, providers="cpu")
    with pytest.raises(PackRejected, match="non-finite"):
        rt.swap(tmp_path / "nan")


def test_predict_single_sample_and_batch(synthetic_ws):
    rt = Runtime(synthetic_ws.root, providers="cpu")
    batch = sample_inputs(synthetic_ws)
    many = rt.predict(batch)
    one = rt.predict({m: x[3] for m, x in batch.items()})
    assert len(many.labels) == 8 and len(one.labels) == 1
    assert one.labels[0] == many.labels[3]
    np.testing.assert_allclose(one.probabilities[0], many.probabilities[3], atol=1e-5)
    assert set(many.timings_ms) == {"preprocess", "backbone", "pack", "total"}
    assert np.allclose(many.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert many.labels == [rt.pack.label_names[i] for i in many.indices]


def test_lanes_answer_as_one_modality_after_another(synthetic_ws, monkeypatch):
    """Modalities side by side (each backbone on one thread, all but the last in lane threads) give the
    answers of the sequential runtime; a sample that cannot be preprocessed in a lane is an InputError
    and the lanes keep serving; fixed session threads or MMCL_EDGE_SERVE_LANES=off mean no lanes."""
    from mmcl_edge.runtime.backbones import heavy_backbone

    batch = sample_inputs(synthetic_ws)
    monkeypatch.setenv("MMCL_EDGE_SERVE_LANES", "off")
    one_after_another = Runtime(synthetic_ws.root, providers="cpu")
    monkeypatch.setenv("MMCL_EDGE_SERVE_LANES", "on")
    assert not Runtime(synthetic_ws.root, providers="cpu", threads=1).backbones.lanes
    rt = Runtime(synthetic_ws.root, providers="cpu")
    assert rt.backbones.lanes and not one_after_another.backbones.lanes and rt.info()["lanes"]
    threads_seen = {}
    for m, runner in rt.backbones._runners.items():  # the real sessions, run where they are called
        def watched(x, m=m, runner=runner):
            threads_seen[m] = threading.current_thread().name
            return runner(x)
        rt.backbones._runners[m] = watched
    side_by_side = rt.predict(batch)
    reference = one_after_another.predict(batch)
    assert side_by_side.labels == reference.labels and side_by_side.modalities == reference.modalities
    np.testing.assert_allclose(side_by_side.probabilities, reference.probabilities, atol=1e-5)
    assert sorted(n.startswith("mmcl-lane") for n in threads_seen.values()) == [False, True]
    assert sum(side_by_side.timings_ms[k] for k in ("preprocess", "backbone", "pack")) == pytest.approx(
        side_by_side.timings_ms["total"], abs=1e-6)
    last = list(batch)[-1]
    with pytest.raises(InputError, match="could not be preprocessed"):
        rt.predict({**batch, last: batch[last][:, :1]})
    assert rt.predict(batch).labels == reference.labels
    rt.backbones.heavy = last  # a heavy backbone runs in the request's own thread, after the lanes
    threads_seen.clear()
    assert rt.predict({m: batch[m] for m in reversed(batch)}).labels == reference.labels
    assert not threads_seen[last].startswith("mmcl-lane") and threads_seen[list(batch)[0]].startswith("mmcl-lane")
    monkeypatch.setenv("MMCL_EDGE_SERVE_LANES", "sideways")
    with pytest.raises(RuntimeUserError, match="MMCL_EDGE_SERVE_LANES"):
        Runtime(synthetic_ws.root, providers="cpu")
    # the rule "auto" applies to the backbones' one-thread times: AV-Digits' two like networks each
    # take one thread, UTD-MHAD's depth network (94% of the time) keeps every core
    assert heavy_backbone({"audio": 1.33, "image": 1.32}) is None
    assert heavy_backbone({"imu": 0.09, "skeleton": 0.43, "depth": 8.3}) == "depth"


_BLAS_CHILD = """
import json, sys
import numpy as np  # loaded first, as in any program that embeds the runtime: the env var is too late now
from threadpoolctl import threadpool_info
from mmcl_edge.runtime import Runtime
blas = lambda: sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})
before = blas()
rt = Runtime(sys.argv[1], providers="cpu")
print(json.dumps({"before": before, "after": blas(), "limited": rt.blas_limited}))
"""


def test_runtime_keeps_numpy_blas_on_one_thread_unless_told(synthetic_ws, tmp_path):
    """A Runtime made from Python sets numpy's BLAS to one thread for its process (the CLI does it
    through the environment); a user's OPENBLAS_NUM_THREADS or MMCL_EDGE_THREAD_POLICY=off keeps it."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in (
        "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "GOTO_NUM_THREADS", "MKL_NUM_THREADS",
        "MMCL_EDGE_THREAD_ENV_SET", "MMCL_EDGE_THREAD_POLICY")}

    def child(**extra):
        r = subprocess.run([sys.executable, "-c", _BLAS_CHILD, str(synthetic_ws.root)], env={**env, **extra},
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    default = child()
    assert default["limited"] and default["after"] == [1] and default["before"]
    for extra in ({"OPENBLAS_NUM_THREADS": "2"}, {"MMCL_EDGE_THREAD_POLICY": "off"}):
        kept = child(**extra)
        assert not kept["limited"] and kept["after"] == kept["before"], (extra, kept)
    assert child(MMCL_EDGE_THREAD_POLICY="off")["before"] == default["before"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux only")
def test_swap_nice_loads_packs_in_a_thread_of_that_niceness(synthetic_ws, monkeypatch):
    """swap_nice: packs are validated, built and warmed in one loader thread whose niceness is moved
    by that much (requests keep theirs); 0 loads in the caller's thread; a bad env value is an error."""
    import os

    import mmcl_edge.runtime.service as service

    where = []
    real_load_pack = service.load_pack

    def recording_load_pack(*args, **kwargs):
        where.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return real_load_pack(*args, **kwargs)

    monkeypatch.setattr(service, "load_pack", recording_load_pack)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    rt = Runtime(synthetic_ws.root, providers="cpu", swap_nice=3)
    first = packs_of(synthetic_ws)[0]
    assert rt.swap(first).version == 0 and rt.predict(sample_inputs(synthetic_ws)).pack_version == 0
    assert len(where) == 2 and all(name.startswith("mmcl-pack-loader") and nice == mine + 3 for name, nice in where)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the caller's is untouched
    where.clear()
    Runtime(synthetic_ws.root, providers="cpu", swap_nice=0).swap(first)
    assert [name for name, _ in where] == [threading.current_thread().name] * 2
    monkeypatch.setenv("MMCL_EDGE_SWAP_NICE", "low")
    with pytest.raises(RuntimeUserError, match="MMCL_EDGE_SWAP_NICE"):
        Runtime(synthetic_ws.root, providers="cpu")


def test_predict_rejects_bad_inputs_in_plain_words(synthetic_ws):
    rt = Runtime(synthetic_ws.root, providers="cpu")
    batch = sample_inputs(synthetic_ws)
    first = next(iter(batch))
    with pytest.raises(InputError, match="none was given"):
        rt.predict({})
    with pytest.raises(InputError, match="dict"):
        rt.predict(None)
    with pytest.raises(InputError, match="unknown"):
        rt.predict({**batch, "lidar": batch[first]})
    with pytest.raises(InputError, match="same"):
        rt.predict({m: (x[:3] if m == first else x) for m, x in batch.items()})


def test_concurrent_predictions_during_repeated_swaps(synthetic_ws, tmp_path):
    """Predict threads run while good and bad packs are swapped in over and over: no request fails,
    each response equals what exactly one pack gives, and a rejection never stops the good pack."""
    ws = synthetic_ws
    good = packs_of(ws)
    bad = [bad_pack(good[-1], tmp_path / k, k) for k in ("corrupt-manifest", "other-backbones", "truncated-onnx")]
    inputs = sample_inputs(ws)
    expected = {}
    for p in good:  # what each pack alone answers
        ref = Runtime(ws.root, providers="cpu", pack=p)
        expected[ref.pack.version] = ref.predict(inputs).probabilities
    rt = Runtime(ws.root, providers="cpu", pack=good[0])
    stop = threading.Event()
    responses, failures = [], []

    def client():
        while not stop.is_set():
            try:
                r = rt.predict(inputs)
                responses.append((r.pack_version, r.probabilities))
            except Exception as exc:  # any failure is a test failure
                failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    swaps, rejections = 0, 0
    deadline = time.monotonic() + 6.0
    i = 0
    while time.monotonic() < deadline:
        target = good[i % len(good)]
        rt.swap(target)
        swaps += 1
        spoiled = bad[i % len(bad)]
        with pytest.raises(PackRejected):
            rt.swap(spoiled)
        rejections += 1
        assert rt.pack.folder == target  # the good pack still serves after the rejection
        i += 1
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert swaps >= 6 and rejections >= 6
    assert len(responses) > 50
    served = set()
    for version, probs in responses:
        assert version in expected
        np.testing.assert_allclose(probs, expected[version], atol=1e-5)
        served.add(version)
    assert len(served) >= 2  # responses really came from several packs


TORCH_FREE_SCRIPT = r"""
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")
sys.meta_path.insert(0, NoTorch())
import json, numpy as np
from mmcl_edge.runtime import Runtime
ws, inputs_file, other = sys.argv[1], sys.argv[2], sys.argv[3]
with np.load(inputs_file) as z:
    inputs = {k: z[k] for k in z.files}
rt = Runtime(ws)
rt.start_watcher(0.05)
first = rt.predict(inputs)
rt.swap(other)
second = rt.predict(inputs)
rt.stop()
assert "torch" not in sys.modules
print(json.dumps({"first": first.pack_version, "second": second.pack_version, "labels": second.labels}))
"""


def test_runtime_runs_with_torch_unimportable(synthetic_ws, tmp_path):
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **sample_inputs(synthetic_ws))
    first_pack = packs_of(synthetic_ws)[0]
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(synthetic_ws.root), str(inputs), str(first_pack)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    current = int((synthetic_ws.root / "current").read_text().strip()[1:])
    assert out["first"] == current and out["second"] == 0
    assert len(out["labels"]) == 8


def test_runtime_package_has_no_torch_import():
    runtime_dir = Path(__file__).resolve().parents[1] / "runtime"
    for path in runtime_dir.glob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path


def test_swap_in_background_returns_future(synthetic_ws, tmp_path):
    rt = Runtime(synthetic_ws.root, providers="cpu")
    first = packs_of(synthetic_ws)[0]
    assert rt.swap_in_background(first).result(timeout=60).version == 0
    assert rt.pack.version == 0
    spoiled = bad_pack(first, tmp_path / "bad", "truncated-onnx")
    with pytest.raises(PackRejected):
        rt.swap_in_background(spoiled).result(timeout=60)
    assert rt.pack.version == 0
