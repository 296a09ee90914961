"""Issue #9, parts F-G: bounded, validated inputs; property tests of the manifest parser and the validators."""
from __future__ import annotations

import json
import shutil
import wave

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mmcl_edge.errors import DataFormatError, InputError, PackRejected
from mmcl_edge.preprocess import PreprocessSpec
from mmcl_edge.runtime import Runtime
from mmcl_edge.runtime.pack import read_manifest
from mmcl_edge.runtime.validation import Limits, check_batch, split

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@pytest.fixture(scope="module")
def rt(synthetic_ws):
    return Runtime(synthetic_ws.root, providers="cpu", limits=Limits(max_batch=16))


def batch_of(synthetic_ws, n=4):
    sc = synthetic_ws.scenario()
    return {m: np.stack(sc.test.samples[m][:n]).astype(np.float32) for m in sc.specs}


@pytest.mark.parametrize("value,match", [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
def test_non_finite_input_is_refused(rt, synthetic_ws, value, match):
    x = batch_of(synthetic_ws)
    first = next(iter(x))
    x[first][2, 0] = value
    with pytest.raises(InputError, match=f"sample 2 contains {match}"):
        rt.predict(x)


def test_none_and_non_dicts_are_input_errors(rt, synthetic_ws):
    with pytest.raises(InputError, match="dict"):
        rt.predict(None)
    x = batch_of(synthetic_ws)
    with pytest.raises(InputError, match="none was given"):  # None marks a modality absent: not all may be
        rt.predict({m: None for m in x})
    with pytest.raises(InputError, match="numeric"):
        rt.predict({m: np.array(["a"] * v.shape[1]) for m, v in x.items()})


def test_batch_limit_is_enforced_before_any_work(rt, synthetic_ws):
    x = {m: np.repeat(v, 5, axis=0) for m, v in batch_of(synthetic_ws).items()}  # 20 > 16
    with pytest.raises(InputError, match="limit is 16"):
        rt.predict(x)


def test_image_layouts():
    spec = PreprocessSpec("image", image_size=8)
    with pytest.raises(InputError, match="ambiguous"):
        split("cam", "image", np.zeros((3, 20, 30)))
    with pytest.raises(InputError, match="2 channels"):
        split("cam", "image", np.zeros((20, 30, 2)))
    assert split("cam", "image", np.zeros((20, 30, 3)))[1] is True
    assert len(split("cam", "image", np.zeros((5, 20, 30)))[0]) == 5
    assert split("cam", "image", [np.zeros((3, 20, 30))])[1] is False  # in a list: one CHW image, unambiguous
    with pytest.raises(InputError, match="pixels"):
        check_batch("cam", "image", [np.zeros((5000, 5000), np.float32)], spec, Limits())
    with pytest.raises(InputError, match="60 s"):
        check_batch("mic", "audio", [np.zeros(8000 * 61, np.float32)], PreprocessSpec("audio"), Limits())


def test_wav_at_another_rate_is_resampled(tmp_path):
    from mmcl_edge.runtime.inputs import read_sample

    rate, seconds = 44100, 0.5
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.stack([tone, tone], axis=1).tobytes())
    x = read_sample(tmp_path / "a.wav", PreprocessSpec("audio", sample_rate=8000))
    assert x.ndim == 1 and abs(len(x) - 4000) <= 1
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * 8000 / len(x) - 440) < 10  # still a 440 Hz tone


def test_predict_json_is_valid_json(synthetic_ws, tmp_path):
    from typer.testing import CliRunner

    from mmcl_edge.cli.main import app

    x = batch_of(synthetic_ws)
    np.savez(tmp_path / "ok.npz", **{f"x_{m}": v for m, v in x.items()})
    r = CliRunner().invoke(app, ["predict", "-w", str(synthetic_ws.root), "-i", str(tmp_path / "ok.npz"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert len(doc["labels"]) == 4 and all(0 <= s <= 1 for s in doc["scores"]) and doc["authenticated"] is False
    first = next(iter(x))
    x[first][0, 0] = np.inf
    np.savez(tmp_path / "inf.npz", **{f"x_{m}": v for m, v in x.items()})
    r = CliRunner().invoke(app, ["predict", "-w", str(synthetic_ws.root), "-i", str(tmp_path / "inf.npz"), "--json"])
    assert r.exit_code == 2 and "infinite" in r.output and "Traceback" not in r.output


# property tests ---------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)


@FAST
@given(mutation=st.dictionaries(st.sampled_from(["schema", "version", "task", "classes", "label_names", "inputs",
                                                 "outputs", "files", "sha256", "created", "backbones", "extra"]),
                                json_values, max_size=4))
def test_manifest_parser_only_ever_raises_pack_rejected(synthetic_ws, tmp_path_factory, mutation):
    folder = tmp_path_factory.mktemp("m") / "p"
    shutil.copytree(synthetic_ws.root / "packs" / "v0000", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(mutation)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    try:
        read_manifest(folder)
    except PackRejected:
        pass


@FAST
@given(x=hnp.arrays(dtype=st.sampled_from([np.float32, np.float64]),
                    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
                    elements=st.floats(-1e6, 1e6, width=32) | st.sampled_from([0.0, np.nan, np.inf, -np.inf])),
       kind=st.sampled_from(["image", "audio", "timeseries", "vector"]))
def test_input_validator_accepts_or_refuses_in_words(x, kind):
    spec = PreprocessSpec(kind, image_size=8)
    try:
        samples, _ = split("m", kind, x)
        check_batch("m", kind, samples, spec, Limits())
    except InputError:
        return
    from mmcl_edge.preprocess import preprocess_batch

    out = preprocess_batch(samples, spec) if kind != "vector" or len({s.shape for s in samples}) == 1 else None
    if out is not None:
        assert np.isfinite(out).all()


@FAST
@given(n=st.integers(0, 5), t=st.integers(1, 6), c=st.integers(1, 4),
       y_kind=st.sampled_from(["int", "float", "str", "2d"]), nan=st.booleans())
def test_data_validator_accepts_or_refuses_in_words(tmp_path_factory, n, t, c, y_kind, nan):
    from mmcl_edge.data.generic import load_generic

    d = tmp_path_factory.mktemp("d")
    x = np.ones((n, t, c), np.float32)
    if nan and n:
        x[0, 0, 0] = np.nan
    y = {"int": np.arange(n) % 2, "float": (np.arange(n) % 2).astype(float), "str": np.array(["a"] * n),
         "2d": np.zeros((n, 2), int)}[y_kind]
    for split_name in ("train", "test"):
        np.savez(d / f"{split_name}.npz", x_s=x, y=y)
    (d / "modalities.json").write_text(json.dumps({"s": {"kind": "timeseries"}}))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            load_generic(d)
        except DataFormatError:
            pass


# issue #16: one answer per sample, and files that cannot decide the memory ------------------------
def cli(*args):
    from typer.testing import CliRunner

    from mmcl_edge.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def write_wav(path, frames: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.astype(np.int16).tobytes())


@pytest.fixture(scope="module")
def audio_image_ws(tmp_path_factory):
    """A workspace on a real audio and a real grey-image modality (raw encodings: no CNN, seconds)."""
    root = tmp_path_factory.mktemp("av-raw")
    rng = np.random.default_rng(0)
    y = np.arange(24) % 4
    audio = np.stack([np.sin(2 * np.pi * (200 + 100 * c) * np.arange(4000) / 8000) for c in y]).astype(np.float32)
    image = np.stack([np.roll(np.eye(8), c, axis=1) * 255 for c in y]).astype(np.float32)
    audio += 0.1 * rng.normal(size=audio.shape).astype(np.float32)
    (root / "data").mkdir()
    for split_ in ("train", "test"):
        np.savez(root / "data" / f"{split_}.npz", x_audio=audio, x_image=image, y=y)
    (root / "data" / "modalities.json").write_text(json.dumps({
        "audio": {"kind": "audio", "encoding": "raw", "sample_rate": 8000},
        "image": {"kind": "image", "encoding": "raw", "image_size": 8}}))
    r = cli("learn", "--data", root / "data", "-w", root / "ws", "--epochs", 1, "--classes-per-task", 4)
    assert r.exit_code == 0, r.output
    write_wav(root / "clip.wav", 10000 * audio[1], 8000)
    from PIL import Image

    Image.fromarray(image[1].astype(np.uint8)).save(root / "digit.png")
    return root


def predict_json(ws, *inputs, extra=()):
    r = cli("predict", "-w", ws, "--json", *[a for i in inputs for a in ("-i", i)], *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_one_file_per_modality_is_one_answer(audio_image_ws):
    """Old code: one 4000-sample clip was cut into 256-value 'samples' and got 16 answers."""
    root = audio_image_ws
    assert len(predict_json(root / "ws", f"audio={root / 'clip.wav'}")["labels"]) == 1
    assert len(predict_json(root / "ws", f"audio={root / 'clip.wav'}", f"image={root / 'digit.png'}")["labels"]) == 1
    assert len(predict_json(root / "ws", f"image={root / 'digit.png'}")["labels"]) == 1


def test_a_huge_png_is_refused_not_cut_into_strips(audio_image_ws, tmp_path):
    """Old code: a 5000 x 5000 PNG was cut into strips of 256 rows, past the 4096² pixel limit."""
    from PIL import Image

    Image.new("L", (5000, 5000)).save(tmp_path / "huge.png")
    r = cli("predict", "-w", audio_image_ws / "ws", "--json", "-i", f"image={tmp_path / 'huge.png'}")
    assert r.exit_code == 2 and "5000 x 5000 pixels" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("n", [1, 3])
def test_npz_of_grey_images_is_a_batch(audio_image_ws, tmp_path, n):
    """Old code: x_image [N, 8, 8] from an .npz was 'ambiguous' (N = 1 and 3 are channel counts)."""
    image = np.stack([np.roll(np.eye(8), c, axis=1) * 255 for c in range(n)]).astype(np.float32)
    np.savez(tmp_path / "grey.npz", x_image=image)
    doc = predict_json(audio_image_ws / "ws", tmp_path / "grey.npz")
    assert len(doc["labels"]) == n and doc["modalities"] == ["image"]
    np.savez(tmp_path / "both.npz", x_image=image, x_audio=np.zeros((n, 4000), np.float32))
    assert len(predict_json(audio_image_ws / "ws", tmp_path / "both.npz")["labels"]) == n


def test_npz_answers_once_per_sample_past_the_batch_limit(synthetic_ws, tmp_path):
    x = {m: np.repeat(v, 75, axis=0) for m, v in batch_of(synthetic_ws).items()}  # 300 > max_batch 256
    np.savez(tmp_path / "many.npz", **{f"x_{m}": v for m, v in x.items()})
    doc = predict_json(synthetic_ws.root, tmp_path / "many.npz")
    assert len(doc["labels"]) == 300 and len(doc["scores"]) == 300
    assert len(predict_json(synthetic_ws.root, tmp_path / "many.npz", extra=("--samples", "7"))["labels"]) == 1
    assert len(predict_json(synthetic_ws.root, tmp_path / "many.npz", extra=("--samples", "10:270"))["labels"]) == 260


@pytest.mark.parametrize("frames,rate", [(8000, 1), (400_000, 1), (6100, 100)])
def test_wav_header_is_checked_before_reading_or_resampling(tmp_path, frames, rate):
    """Old code: a 16 KB WAV declaring 1 Hz was resampled to 64 M samples (1.4 GB) before any limit;
    an 800 KB one asked for 23.8 GiB."""
    from mmcl_edge.runtime.inputs import read_sample

    path = tmp_path / "bomb.wav"
    write_wav(path, np.zeros(frames), rate)
    with pytest.raises(InputError, match="declares"):
        read_sample(path, PreprocessSpec("audio", sample_rate=8000), Limits())


def forged_npz(path, **members):
    """An .npz whose members' headers claim the given shapes over a few bytes of data."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, (shape, data) in members.items():
            f = io.BytesIO()
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            z.writestr(f"{name}.npy", f.getvalue() + data)


def test_npz_members_are_size_checked_and_unused_ones_never_read(synthetic_ws, tmp_path):
    """Old code: a member claiming (2, 10^12) was a MemoryError traceback; every member was inflated."""
    x = batch_of(synthetic_ws, 2)
    m0, m1 = x
    forged_npz(tmp_path / "huge.npz", **{f"x_{m0}": ((2, 10**12), x[m0].tobytes())})
    r = cli("predict", "-w", synthetic_ws.root, "-i", tmp_path / "huge.npz")
    assert r.exit_code == 2 and "declares shape (2, 1000000000000)" in r.output and "Traceback" not in r.output
    # a member nobody asks for is never read, whatever it claims
    forged_npz(tmp_path / "extra.npz", **{f"x_{m}": (v.shape, v.tobytes()) for m, v in x.items()},
               junk=((2, 10**12), b""))
    assert len(predict_json(synthetic_ws.root, tmp_path / "extra.npz")["labels"]) == 2


def test_pickled_array_in_a_data_folder_is_one_data_error(tmp_path):
    from mmcl_edge.data.generic import load_generic

    d = tmp_path / "d"
    d.mkdir()
    x = np.empty(8, dtype=object)
    x[:] = [np.zeros(3)] * 8
    for split_ in ("train", "test"):
        np.savez(d / f"{split_}.npz", x_accel=x, y=np.arange(8) % 2)
    (d / "modalities.json").write_text(json.dumps({"accel": {"kind": "vector"}}))
    with pytest.raises(DataFormatError, match="pickle"):
        load_generic(d)
    forged_npz(d / "train.npz", x_accel=((8, 10**12), b""), y=((8,), b"\0" * 32))
    with pytest.raises(DataFormatError, match="declares shape"):
        load_generic(d)
