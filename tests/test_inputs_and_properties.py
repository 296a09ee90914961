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
