"""Sensor modalities end to end without external data: depth video and IMU/skeleton series
preprocessing, the ROCKET-style series encoder, their ONNX export, a three-sensor workspace served
by the torch-free runtime (with sensors dropping out), and the frozen-feature baselines."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mmcl_edge.preprocess import PreprocessSpec, preprocess, preprocess_batch, standardised_series

MEAN, STD = 127.0 / 255.0, 128.0 / 255.0


def norm(v: float) -> float:
    """The ImageNet normalisation the video preprocessing ends with."""
    return (v - MEAN) / STD


def depth_clip(rng, frames=10, h=32, w=32, lo=800, hi=4000) -> np.ndarray:
    """A uint16 depth clip in millimetres: a moving person-like blob and a wall strip, 0 elsewhere."""
    x = np.zeros((frames, h, w), np.uint16)
    for f in range(frames):
        r, c = 4 + f % 6, 6 + f
        x[f, r:r + 10, c:c + 6] = rng.integers(lo, 2000, (10, 6))
    x[:, :, w - 4:] = hi   # a far wall on the right edge, in every frame
    x[0, 0, w - 4] = lo    # the nearest reading of the clip
    return x


# 1. video preprocessing ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
def test_grey_or_depth_clip_shapes_and_dtype(dtype):
    rng = np.random.default_rng(0)
    spec = PreprocessSpec("video", image_size=24, frames=6)
    clip = rng.integers(0, 250, (9, 30, 40)).astype(dtype)
    out = preprocess(clip, spec)
    assert out.shape == (6, 3, 24, 24) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= norm(0.0) - 1e-5 and out.max() <= norm(1.0) + 1e-5


def test_colour_clip_shape_and_dtype():
    rng = np.random.default_rng(1)
    out = preprocess(rng.integers(0, 255, (7, 20, 28, 3), dtype=np.uint8), PreprocessSpec("video", image_size=16, frames=4))
    assert out.shape == (4, 3, 16, 16) and out.dtype == np.float32 and np.isfinite(out).all()


def test_default_video_spec():
    spec = PreprocessSpec("video")
    assert (spec.image_size, spec.frames, spec.encoding) == (64, 16, "cnn")
    assert PreprocessSpec("image").image_size == 96


@pytest.mark.parametrize("n_frames, h, w", [(1, 10, 10), (5, 17, 23), (16, 64, 64), (40, 48, 36)])
def test_any_frame_count_and_size_is_resampled(n_frames, h, w):
    rng = np.random.default_rng(n_frames)
    spec = PreprocessSpec("video", image_size=20, frames=8)
    clip = rng.integers(0, 3000, (n_frames, h, w)).astype(np.uint16)
    out = preprocess(clip, spec)
    assert out.shape == (8, 3, 20, 20) and np.isfinite(out).all()


def test_frames_are_picked_evenly_nearest_frame():
    """Frame f of a clip is filled with the value f: which frames were picked is readable from the output."""
    clip = np.stack([np.full((8, 8), 100 + 10 * f, np.uint16) for f in range(40)])
    clip[:, 0, 0] = 1  # one fixed reading so the clip's range is 1 .. 490 in every case
    out = preprocess(clip, PreprocessSpec("video", image_size=8, frames=16))
    values = out[:, 0, 4, 4] * STD + MEAN                      # back to [0.2, 1]
    picked = np.round(((values - 0.2) / 0.8 * (490 - 1) + 1 - 100) / 10).astype(int)
    np.testing.assert_array_equal(picked, np.round(np.linspace(0, 39, 16)).astype(int))


def test_depth_zeros_stay_no_reading_and_readings_map_into_0_2_to_1():
    rng = np.random.default_rng(2)
    clip = depth_clip(rng)
    spec = PreprocessSpec("video", image_size=32, frames=10)   # native size and frame count: no blending
    out = preprocess(clip, spec)
    ch0 = out[:, 0]
    never = (clip == 0).all(axis=0)                            # pixels without a reading in any frame
    assert never.sum() > 100
    np.testing.assert_allclose(ch0[:, never], norm(0.0), atol=1e-6)
    valid = clip > 0
    assert ch0[valid].min() == pytest.approx(norm(0.2), abs=1e-5)   # the nearest reading
    assert ch0[valid].max() == pytest.approx(norm(1.0), abs=1e-5)   # the farthest
    np.testing.assert_allclose(ch0[~valid], norm(0.0), atol=1e-6)           # every hole, in every frame
    assert norm(0.2) - norm(0.0) == pytest.approx(0.2 / STD)                # a gap: never confused
    # motion channels: the first frame has changed from nothing; everything stays in [0, 1] before normalising
    np.testing.assert_allclose(out[0, 1], norm(0.0), atol=1e-6)
    assert out[:, 1:].min() >= norm(0.0) - 1e-5 and out[:, 1:].max() <= norm(1.0) + 1e-5
    assert out[1:, 1].max() > norm(0.5)                        # the blob moves: change is seen
    # the running sum of change never decreases
    assert (np.diff(out[:, 2], axis=0) >= -1e-5).all()


def test_depth_scaling_ignores_units_but_not_holes():
    """Millimetres (uint16) and metres (float32) give the same clip; the holes stay holes."""
    clip = depth_clip(np.random.default_rng(3))
    spec = PreprocessSpec("video", image_size=16, frames=5)
    np.testing.assert_allclose(preprocess(clip, spec), preprocess(clip.astype(np.float32) / 1000.0, spec), atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_all_zero_clip_is_finite(dtype):
    for encoding in ("cnn", "raw"):
        out = preprocess(np.zeros((6, 12, 14), dtype), PreprocessSpec("video", image_size=16, frames=4, encoding=encoding))
        assert np.isfinite(out).all()
    out = preprocess(np.zeros((6, 12, 14), dtype), PreprocessSpec("video", image_size=16, frames=4))
    np.testing.assert_allclose(out, norm(0.0), atol=1e-6)


@pytest.mark.parametrize("shape", [(20, 24), (4, 20, 24, 2), (4, 20, 24, 5), (0, 8, 8), (2, 3, 4, 5, 3)])
def test_bad_video_shapes_raise_value_error(shape):
    with pytest.raises(ValueError):
        preprocess(np.ones(shape, np.uint16), PreprocessSpec("video", image_size=16, frames=4))


def test_raw_video_encoding_is_small_and_z_scored():
    clip = depth_clip(np.random.default_rng(4), frames=9, h=40, w=30)
    out = preprocess(clip, PreprocessSpec("video", frames=6, encoding="raw"))
    assert out.shape == (6, 12, 12) and out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-4 and float(out.std()) == pytest.approx(1.0, abs=1e-3)


def test_video_batch_stacks_clips_of_different_lengths():
    rng = np.random.default_rng(5)
    spec = PreprocessSpec("video", image_size=16, frames=4)
    clips = [depth_clip(rng, frames=n) for n in (4, 9, 13)]
    batch = preprocess_batch(clips, spec)
    assert batch.shape == (3, 4, 3, 16, 16) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess(clips[1], spec))


# 2. the random-convolution series encoder ---------------------------------------------------------

def test_rocket_is_seeded():
    import torch

    from mmcl_edge.backbones import RandomConvSeriesEncoder

    a, b, c = RandomConvSeriesEncoder(6, seed=0), RandomConvSeriesEncoder(6, seed=0), RandomConvSeriesEncoder(6, seed=1)
    assert a.identity() == b.identity() != c.identity()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 6, 128)).astype(np.float32))
    with torch.no_grad():
        for ta, tb, tc in zip(a(x), b(x), c(x)):
            assert torch.equal(ta, tb)
            assert not torch.equal(ta, tc)


@pytest.mark.parametrize("channels, length, kernels, segments", [(6, 128, 480, 4), (12, 128, 120, 4), (3, 64, 60, 2)])
def test_rocket_tap_shapes_and_proportions(single_thread, channels, length, kernels, segments):
    import torch

    from mmcl_edge.backbones import RandomConvSeriesEncoder

    enc = RandomConvSeriesEncoder(channels, length=length, kernels=kernels, segments=segments)
    assert enc.input_shape == (channels, length)
    assert [t.name for t in enc.taps] == ["short", "mid", "long"]
    rng = np.random.default_rng(1)
    series = [rng.normal(size=(90, channels)).cumsum(axis=0) for _ in range(3)]
    x = torch.from_numpy(np.stack([standardised_series(s, length) for s in series]))
    with torch.no_grad():
        taps = enc(x)
    assert len(taps) == len(enc.taps)
    steps = length // segments
    for g, (tap, spec) in enumerate(zip(taps, enc.taps)):
        assert tuple(tap.shape) == (3, spec.tokens, spec.dim) and spec.tokens == segments
        # per dilation of this group: [proportion of positive values (K), max (K)]
        n_dil = sum(1 for t in enc.tap_of if t == g)
        k = spec.dim // (2 * n_dil)
        blocks = tap.numpy().reshape(3, segments, n_dil, 2, k)
        ppv = blocks[:, :, :, 0]
        assert ppv.min() >= 0.0 and ppv.max() <= 1.0
        np.testing.assert_allclose(ppv * steps, np.round(ppv * steps), atol=1e-4)  # a count of time steps
        assert 0.0 < ppv.mean() < 1.0
        assert np.isfinite(blocks[:, :, :, 1]).all()


def test_rocket_constant_input_is_finite(single_thread):
    import torch

    from mmcl_edge.backbones import RandomConvSeriesEncoder

    spec = PreprocessSpec("timeseries")
    x = preprocess(np.full((50, 6), 9.81, np.float32), spec)   # a resting accelerometer
    assert x.shape == (6, 128) and np.isfinite(x).all()
    with torch.no_grad():
        taps = RandomConvSeriesEncoder(6)(torch.from_numpy(x[None]))
    assert all(torch.isfinite(t).all() for t in taps)


def test_backbone_for_default_timeseries_is_rocket_with_the_channel_count():
    from mmcl_edge.taps import backbone_for

    spec = PreprocessSpec("timeseries", series_length=64)
    assert spec.encoding == "rocket"
    bb = backbone_for(spec, np.zeros((40, 7), np.float32))
    assert bb.name == "rocket" and bb.input_shape == (7, 64)
    raw = backbone_for(PreprocessSpec("timeseries", encoding="raw"), np.zeros((40, 7), np.float32))
    assert raw.name == "raw" and raw.input_shape == (7, 32) and raw.taps[0].dim == 7 * 32
    video = backbone_for(PreprocessSpec("video", image_size=32, frames=4), np.zeros((6, 20, 24), np.uint16))
    assert video.name == "efficientnet-lite0-video" and video.input_shape == (4, 3, 32, 32)


# 3. ONNX export parity -----------------------------------------------------------------------------

def _parity(backbone, x: np.ndarray, path) -> list[float]:
    import onnx
    import onnxruntime as ort
    import torch

    from mmcl_edge.export.backbone_export import export_backbone

    export_backbone(backbone, path)
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert [o.name for o in sess.get_outputs()] == [t.name for t in backbone.taps]
    with torch.no_grad():
        expected = [t.numpy() for t in backbone(torch.from_numpy(x))]
    got = sess.run(None, {"x": x})
    diffs = []
    for g, e, spec in zip(got, expected, backbone.taps):
        assert g.shape == e.shape == (len(x), spec.tokens, spec.dim)
        diffs.append(float(np.max(np.abs(g - e))))
    return diffs


def test_video_backbone_onnx_matches_pytorch(single_thread, tmp_path):
    from mmcl_edge.backbones import VideoFrameBackbone

    rng = np.random.default_rng(6)
    spec = PreprocessSpec("video", image_size=32, frames=4)
    x = preprocess_batch([depth_clip(rng, frames=n, h=40, w=48) for n in (5, 8, 12)], spec)
    bb = VideoFrameBackbone(image_size=32, frames=4)
    assert [t.tokens for t in bb.taps] == [4, 4, 4]
    diffs = _parity(bb, x, tmp_path / "video.onnx")
    assert max(diffs) <= 1e-4, diffs


def test_rocket_onnx_matches_pytorch(single_thread, tmp_path):
    from mmcl_edge.backbones import RandomConvSeriesEncoder

    rng = np.random.default_rng(7)
    spec = PreprocessSpec("timeseries")
    t = np.linspace(0, 2, 60)[:, None]
    series = [np.sin(2 * np.pi * f * t + np.arange(6)) + rng.normal(0, 0.2, (60, 6)) for f in (1.0, 2.5, 4.0)]
    x = preprocess_batch(series, spec)
    diffs = _parity(RandomConvSeriesEncoder(channels=6), x, tmp_path / "rocket.onnx")
    assert max(diffs) <= 1e-4, diffs


# 4. a three-sensor workspace served by the torch-free runtime ---------------------------------------

CLASS_NAMES = ["walk", "wave", "sit", "jump"]


def write_three_sensor_data(folder, train_per_class=10, test_per_class=4, seed=0):
    """imu [60, 6] and skeleton [30, 12]: class-dependent rhythm; depth [6, 20, 24] uint16: a blob
    whose size and direction of motion depend on the class, on a background of zeros (no reading)."""
    rng = np.random.default_rng(seed)

    def make(n_each):
        imu, skel, depth, y = [], [], [], []
        for c in range(4):
            for _ in range(n_each):
                t = np.linspace(0, 2, 60)[:, None]
                f = 1.0 + 1.5 * c + rng.normal(0, 0.1)
                imu.append(np.sin(2 * np.pi * f * t + rng.uniform(0, 6, 6)) + rng.normal(0, 0.3, (60, 6)))
                ts = np.linspace(0, 1, 30)[:, None]
                skel.append(np.sin(2 * np.pi * (0.5 + c) * ts + np.linspace(0, 1, 12)) + rng.normal(0, 0.2, (30, 12)))
                # per-frame features are pooled over space: class = blob size x direction of motion
                clip = np.zeros((6, 20, 24), np.uint16)
                side = 5 if c % 2 == 0 else 10
                r0, c0 = rng.integers(1, 4, 2)
                for k in range(6):
                    r, col = (r0, c0 + 2 * k) if c < 2 else (r0 + k, c0)
                    clip[k, r:r + side, col:col + side] = rng.integers(1500, 2500, (side, side))
                depth.append(clip)
                y.append(c)
        return (np.array(imu, np.float32), np.array(skel, np.float32), np.array(depth, np.uint16), np.array(y))

    folder.mkdir(parents=True)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        imu, skel, depth, y = make(n)
        np.savez(folder / f"{split}.npz", x_imu=imu, x_skeleton=skel, x_depth=depth, y=y)
    (folder / "modalities.json").write_text(json.dumps({
        "imu": {"kind": "timeseries", "sample_rate": 50}, "skeleton": {"kind": "timeseries"},
        "depth": {"kind": "video", "frames": 4, "image_size": 32}, "class_names": CLASS_NAMES}))
    return folder


@pytest.fixture(scope="module")
def sensor_ws(tmp_path_factory):
    import torch

    from mmcl_edge.config import LearnConfig
    from mmcl_edge.workspace import Workspace

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sensors")
    data = write_three_sensor_data(root / "data")
    ws = Workspace.create(root / "ws", {"data": str(data), "setting": "class-il", "classes_per_task": 2, "seed": 0},
                          LearnConfig().override({"train.epochs": 2}))
    report = ws.learn()
    torch.set_num_threads(before)
    return ws, data, report


TORCH_FREE_PREDICT = r"""
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")
sys.meta_path.insert(0, NoTorch())
import json, numpy as np
from mmcl_edge.runtime import InputError, Runtime
ws, test_file = sys.argv[1], sys.argv[2]
with np.load(test_file) as z:
    x = {m: z[f"x_{m}"] for m in ("imu", "skeleton", "depth")}
rt = Runtime(ws, providers="cpu")
out = {}
for case, inputs in (("all", x), ("no_depth", {"imu": x["imu"], "skeleton": x["skeleton"]}),
                     ("depth_none", {**x, "depth": None}), ("imu_only", {"imu": x["imu"]})):
    p = rt.predict(inputs)
    out[case] = {"labels": p.labels, "modalities": p.modalities, "probabilities": p.probabilities.tolist()}
try:
    rt.predict({"imu": None, "skeleton": None, "depth": None})
    out["none"] = "answered"
except InputError as exc:
    out["none"] = "InputError: " + str(exc)
try:
    import torch
    out["torch"] = "imported"
except ImportError:
    out["torch"] = "blocked"
out["torch_loaded"] = "torch" in sys.modules
print(json.dumps(out))
"""


def test_three_sensor_workspace(sensor_ws):
    ws, data, report = sensor_ws
    assert len(report["accuracy_matrix"]) == 2
    index = json.loads((ws.root / "backbones" / "backbones.json").read_text())["modalities"]
    assert {m: e["name"] for m, e in index.items()} == {"imu": "rocket", "skeleton": "rocket",
                                                         "depth": "efficientnet-lite0-video"}
    assert index["imu"]["input_shape"] == [6, 128] and index["skeleton"]["input_shape"] == [12, 128]
    assert index["depth"]["input_shape"] == [4, 3, 32, 32]
    assert (ws.root / "current").read_text().strip() == "v0001"


def test_runtime_preprocessing_and_taps_are_the_learners(sensor_ws):
    """The runtime preprocesses with the same numpy code and spec, and its ONNX taps equal the learner's cached taps."""
    from mmcl_edge.runtime import Runtime
    from mmcl_edge.stream import label_map

    ws, data, _ = sensor_ws
    sc, src = ws.scenario(), ws.tap_source()
    rt = Runtime(ws.root, providers="cpu")
    idx = np.arange(6)
    cached, _, _ = src.taps("test", idx, label_map(sc, len(sc.tasks) - 1))
    for m in ("imu", "skeleton", "depth"):
        assert rt.backbones.specs[m] == src.specs[m] == sc.specs[m]
        samples = [sc.test.samples[m][i] for i in idx]
        pre = rt.backbones.preprocess(m, samples)
        np.testing.assert_array_equal(pre, preprocess_batch(samples, sc.specs[m]))
        got = rt.backbones.run(m, pre)
        for spec, want in zip(src.backbones[m].taps, cached.taps[m]):
            assert np.max(np.abs(got[f"{m}__{spec.name}"] - want)) <= 1e-4


def test_torch_free_runtime_with_three_sensors_and_dropouts(sensor_ws):
    from mmcl_edge.runtime import Runtime

    ws, data, _ = sensor_ws
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_PREDICT, str(ws.root), str(data / "test.npz")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] == "blocked" and out["torch_loaded"] is False
    assert out["none"].startswith("InputError") and "none was given" in out["none"]
    with np.load(data / "test.npz") as z:
        y = z["y"]
        x = {m: z[f"x_{m}"] for m in ("imu", "skeleton", "depth")}
    expected_modalities = {"all": ["imu", "skeleton", "depth"], "no_depth": ["imu", "skeleton"],
                           "depth_none": ["imu", "skeleton"], "imu_only": ["imu"]}
    for case, mods in expected_modalities.items():
        labels = out[case]["labels"]
        assert len(labels) == len(y) and set(labels) <= set(CLASS_NAMES), case
        assert out[case]["modalities"] == mods, case
        probs = np.array(out[case]["probabilities"])
        assert probs.shape == (len(y), 4) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert out["depth_none"]["labels"] == out["no_depth"]["labels"]
    # the torch-free process answers what the runtime answers in this process
    rt = Runtime(ws.root, providers="cpu")
    here = rt.predict(x)
    assert here.labels == out["all"]["labels"]
    np.testing.assert_allclose(here.probabilities, np.array(out["all"]["probabilities"]), atol=1e-5)
    assert rt.predict({"imu": x["imu"]}).labels == out["imu_only"]["labels"]
    # a sensor dropping out changes the answer's inputs, not its validity; all three see the classes
    acc = float(np.mean(np.array([CLASS_NAMES.index(v) for v in out["all"]["labels"]]) == y))
    assert acc > 0.4, acc


def test_cli_predict_json_equals_runtime(sensor_ws):
    from typer.testing import CliRunner

    from mmcl_edge.cli.main import app
    from mmcl_edge.runtime import Runtime

    ws, data, _ = sensor_ws
    r = CliRunner().invoke(app, ["predict", "-w", str(ws.root), "-i", str(data / "test.npz"), "--json"])
    assert r.exit_code == 0, r.output
    labels = json.loads(r.output)["labels"]
    with np.load(data / "test.npz") as z:
        x = {m: z[f"x_{m}"] for m in ("imu", "skeleton", "depth")}
    assert labels == Runtime(ws.root, providers="cpu").predict(x).labels


# 5. baselines with known answers ----------------------------------------------------------------

def gaussian_taps(rng, y, dims=(8, 5), sep=4.0, centres=None):
    """Two modalities, two taps each ([N, 2, D]): class c's mean is ``centres[m][c]``; noise N(0, 1)."""
    centres = centres or [rng.normal(0, sep, (4, d)) for d in dims]
    taps = {}
    for m, (d, cen) in enumerate(zip(dims, centres)):
        base = cen[y][:, None, :] + rng.normal(0, 1, (len(y), 2, d))
        taps[f"m{m}"] = [base.astype(np.float32), (base[..., ::-1] * 0.5 + rng.normal(0, 0.5, base.shape)).astype(np.float32)]
    return taps, centres


def modality_taps_of(taps):
    from mmcl_edge.backbones import TapSpec

    return {m: tuple(TapSpec(f"t{i}", t.shape[1], t.shape[2]) for i, t in enumerate(ts)) for m, ts in taps.items()}


def test_ranpac_streaming_equals_joint_and_separates_classes():
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.learners import create_learner
    from mmcl_edge.learners.base import TaskData

    rng = np.random.default_rng(8)
    y_train, y_test = np.repeat(np.arange(4), 30), np.repeat(np.arange(4), 20)
    train_taps, centres = gaussian_taps(rng, y_train)
    test_taps, _ = gaussian_taps(rng, y_test, centres=centres)
    train, test = TaskData(train_taps, y_train), TaskData(test_taps, y_test)
    cfg = LearnConfig().override({"baselines.ranpac_projection": 512})
    mt = modality_taps_of(train_taps)
    stream = create_learner("ranpac", cfg, mt, "class-il", 4)
    stream.learn_task(0, train.subset(np.flatnonzero(y_train < 2)), 2)
    after_first = stream.predict(test.subset(np.flatnonzero(y_test < 2)))
    assert set(np.unique(after_first)) <= {0, 1}
    stream.learn_task(1, train.subset(np.flatnonzero(y_train >= 2)), 4)
    joint = create_learner("ranpac", cfg, mt, "class-il", 4)
    joint.learn_task(0, train.subset(rng.permutation(len(y_train))), 4)
    assert stream.head.gram.shape == (512, 512)  # the configured projection width
    np.testing.assert_array_equal(stream.predict(test), joint.predict(test))
    # equal up to the float32 rounding of the stored sums (solve() rounds them after every task)
    w_stream, w_joint = stream.head.weight.numpy(), joint.head.weight.numpy()
    assert np.abs(w_stream - w_joint).max() <= 2e-3 * np.abs(w_joint).max()
    assert np.mean(stream.predict(test) == y_test) > 0.95


def tiny_series_scenario(seed=0):
    """In memory: a timeseries modality (rhythm by class) and a vector modality (noisy class code)."""
    from mmcl_edge.data.dataset import MultiModalDataset, Scenario, class_incremental_tasks

    rng = np.random.default_rng(seed)

    def split(n_each):
        acc, vec, y = [], [], []
        for c in range(4):
            for _ in range(n_each):
                t = np.linspace(0, 2, 50)[:, None]
                acc.append((np.sin(2 * np.pi * (1 + c) * t + rng.uniform(0, 6, 3)) + rng.normal(0, 0.3, (50, 3))
                            + np.array([0, 0, 9.8])).astype(np.float32))
                vec.append((np.eye(4)[c] + rng.normal(0, 0.4, 4)).astype(np.float32))
                y.append(c)
        return MultiModalDataset({"acc": acc, "vec": vec}, np.array(y))

    train, test = split(12), split(5)
    specs = {"acc": PreprocessSpec("timeseries"), "vec": PreprocessSpec("vector")}
    tasks = class_incremental_tasks(train.y, test.y, 2, seed)
    return Scenario("tiny-series", "class-il", train, test, specs, tasks, ["a", "b", "c", "d"])


def test_raw_ridge_is_closed_form_ridge_on_the_standardised_series(tmp_path):
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.learners import create_learner, tap_encoding
    from mmcl_edge.preprocess import RAW_SERIES_LENGTH
    from mmcl_edge.stream import TapSource, label_map

    sc = tiny_series_scenario()
    assert tap_encoding("raw-ridge") == "raw"
    src = TapSource(sc, tmp_path / "cache", encoding="raw")
    assert src.specs["acc"].encoding == "raw" and src.specs["vec"].encoding == "identity"
    assert src.backbones["acc"].name == "raw" and src.backbones["vec"].name == "identity"
    cfg = LearnConfig()
    learner = create_learner("raw-ridge", cfg, src.modality_taps, sc.setting, sc.num_classes)
    last = len(sc.tasks) - 1
    lmap = label_map(sc, last)
    for t, task in enumerate(sc.tasks):
        data, _, _ = src.taps("train", task.train_idx, label_map(sc, t))
        learner.learn_task(t, data, len(label_map(sc, t)))
    all_test = np.arange(len(sc.test.y))
    test, _, _ = src.taps("test", all_test, lmap)
    # the taps are the standardised 32-step series, flattened into one token
    want = np.stack([standardised_series(sc.test.samples["acc"][i], RAW_SERIES_LENGTH).reshape(-1) for i in all_test])
    assert test.taps["acc"][0].shape == (len(all_test), 1, 3 * RAW_SERIES_LENGTH)
    np.testing.assert_allclose(test.taps["acc"][0][:, 0], want, atol=1e-6)

    # closed-form ridge in numpy on the same features (each tap L2-normalised, concatenated)
    def feats(ds):
        parts = []
        for m in ("acc", "vec"):
            f = np.stack([preprocess(s, src.specs[m]).reshape(-1) for s in ds.samples[m]]).astype(np.float64)
            parts.append(f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12))
        return np.concatenate(parts, axis=1)

    f_train, f_test = feats(sc.train), feats(sc.test)
    y_head = np.array([lmap[int(c)] for c in sc.train.y])
    gram = f_train.T @ f_train
    sums = f_train.T @ np.eye(sc.num_classes)[y_head]
    d = gram.shape[0]
    lam = cfg.baselines.ridge * np.trace(gram) / d
    w = np.linalg.solve(gram + lam * np.eye(d), sums)
    expected = (f_test @ w).argmax(axis=1)
    got = learner.predict(test)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(learner.head.weight.numpy() - w).max() <= 2e-3 * np.abs(w).max()
    assert np.mean(got == test.y) > 0.5


# 6. missing modalities ------------------------------------------------------------------------------

def test_task_data_without_zeroes_one_modality_and_marks_it_absent():
    from mmcl_edge.learners.base import TaskData

    rng = np.random.default_rng(9)
    taps, _ = gaussian_taps(rng, np.arange(6) % 4)
    data = TaskData(taps, np.arange(6) % 4)
    out = data.without("m1")
    assert all(not t.any() and t.shape == o.shape for t, o in zip(out.taps["m1"], taps["m1"]))
    assert all(np.array_equal(t, o) for t, o in zip(out.taps["m0"], taps["m0"]))
    np.testing.assert_array_equal(out.presence(), np.tile([1.0, 0.0], (6, 1)))
    np.testing.assert_array_equal(out.y, data.y)
    both = out.without("m0")
    assert not both.presence().any()
    assert data.presence().all() and all(t.any() for t in data.taps["m1"])  # the original is untouched
    only = out.only(["m1"])
    assert list(only.taps) == ["m1"] and not only.presence().any()


def test_missing_modality_accuracy_on_the_synthetic_scenario(tmp_path):
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.data import load_scenario
    from mmcl_edge.learners import create_learner
    from mmcl_edge.stream import TapSource, missing_modality_accuracy, run_stream

    sc = load_scenario("synthetic-cil", seed=0)
    src = TapSource(sc, tmp_path / "taps")
    learner = create_learner("ridge", LearnConfig(), src.modality_taps, sc.setting, sc.num_classes)
    result = run_stream(sc, learner, src)
    report = result.report()
    missing = missing_modality_accuracy(learner, result.heldouts)
    assert set(missing) == set(sc.modalities)
    assert all(0.0 <= v <= 1.0 for v in missing.values())
    # each modality carries part of the signal: losing one costs accuracy but stays above chance
    for v in missing.values():
        assert 1.0 / sc.num_classes < v < report["final_average_accuracy"] + 1e-9


def test_missing_modality_accuracy_knows_which_sensor_matters(tmp_path):
    """The vector modality is pure noise: losing it costs nothing; losing the series leaves chance."""
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.learners import create_learner
    from mmcl_edge.stream import TapSource, missing_modality_accuracy, run_stream

    sc = tiny_series_scenario(seed=1)
    rng = np.random.default_rng(10)
    for ds in (sc.train, sc.test):
        ds.samples["vec"] = [rng.normal(0, 1, 4).astype(np.float32) for _ in ds.y]
    src = TapSource(sc, tmp_path / "taps")
    learner = create_learner("ridge", LearnConfig(), src.modality_taps, sc.setting, sc.num_classes)
    result = run_stream(sc, learner, src)
    full = result.report()["final_average_accuracy"]
    missing = missing_modality_accuracy(learner, result.heldouts)
    assert full > 0.8
    assert missing["vec"] > 0.8
    assert missing["acc"] < 0.5
