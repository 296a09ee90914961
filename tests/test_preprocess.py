"""Preprocessing per modality kind (numpy only): shapes, dtypes, finite values, the spec's identity."""
from __future__ import annotations

import numpy as np
import pytest

from mmcl_edge.preprocess import KINDS, PreprocessSpec, preprocess, preprocess_batch, resize_2d

rng = np.random.default_rng(0)


def check_image_like(out: np.ndarray, size: int) -> None:
    assert out.shape == (3, size, size)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


@pytest.mark.parametrize("shape", [(28, 20), (8, 8), (40, 30, 3), (3, 40, 30), (16, 16, 4), (16, 16, 1)])
def test_image_shapes(shape):
    spec = PreprocessSpec(kind="image", image_size=24)
    out = preprocess(rng.uniform(0, 255, size=shape), spec)
    check_image_like(out, 24)


def test_grey_image_is_repeated_over_channels_and_normalised():
    spec = PreprocessSpec(kind="image", image_size=16)
    x = np.tile(np.linspace(0.0, 1000.0, 16), (16, 1))     # any numeric range
    out = preprocess(x, spec)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    # min-max to [0, 1], then (v - 127/255) / (128/255)
    assert out.min() == pytest.approx((0.0 - 127 / 255) / (128 / 255), abs=1e-5)
    assert out.max() == pytest.approx((1.0 - 127 / 255) / (128 / 255), abs=1e-5)


def test_rgb_image_keeps_colour_and_layouts_agree():
    spec = PreprocessSpec(kind="image", image_size=12)
    hwc = rng.uniform(0, 1, size=(12, 12, 3)).astype(np.float32)
    hwc[..., 0] += 2.0                                       # a red image
    a = preprocess(hwc, spec)
    b = preprocess(np.moveaxis(hwc, -1, 0), spec)            # the same image as [C, H, W]
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a[0].mean() > a[1].mean() + 1.0                   # channels not collapsed to grey


def test_constant_image_is_finite():
    out = preprocess(np.full((10, 10), 7.0), PreprocessSpec(kind="image", image_size=8))
    check_image_like(out, 8)


def test_resize_2d_identity_and_constant():
    x = rng.normal(size=(2, 9, 7)).astype(np.float32)
    np.testing.assert_allclose(resize_2d(x, 9, 7), x, atol=1e-6)
    np.testing.assert_allclose(resize_2d(np.full((5, 5), 3.0), 11, 4), np.full((11, 4), 3.0), atol=1e-6)


@pytest.mark.parametrize("seconds", [0.0, 0.01, 0.3, 1.0, 2.7])
def test_audio_shapes_for_short_and_long_clips(seconds):
    spec = PreprocessSpec(kind="audio", sample_rate=8000, clip_seconds=1.0, image_size=32)
    n = int(8000 * seconds)
    t = np.arange(n) / 8000.0
    wave = np.sin(2 * np.pi * 440 * t).astype(np.float32) + 0.01 * rng.normal(size=n).astype(np.float32)
    check_image_like(preprocess(wave, spec), 32)


def test_audio_silence_and_int16_input_are_finite():
    spec = PreprocessSpec(kind="audio", image_size=16)
    check_image_like(preprocess(np.zeros(4000, dtype=np.float32), spec), 16)
    check_image_like(preprocess((rng.normal(size=6000) * 3000).astype(np.int16), spec), 16)


def test_audio_tone_pitch_is_visible():
    # a high tone puts its energy higher in the image (low frequencies at the bottom) than a low tone
    spec = PreprocessSpec(kind="audio", image_size=32)
    t = np.arange(8000) / 8000.0
    low = preprocess(np.sin(2 * np.pi * 200 * t), spec)[0]
    high = preprocess(np.sin(2 * np.pi * 3000 * t), spec)[0]
    rows = np.arange(32)
    centre = lambda img: float((img.mean(axis=1) - img.min()) @ rows / (img.mean(axis=1) - img.min()).sum())
    assert centre(high) < centre(low)


@pytest.mark.parametrize("shape", [(200, 3), (50, 6), (10, 1), (300,), (7,)])
def test_timeseries_shapes(shape):
    spec = PreprocessSpec(kind="timeseries", image_size=20, series_length=64, encoding="spectrogram")
    check_image_like(preprocess(rng.normal(size=shape), spec), 20)
    channels = shape[1] if len(shape) == 2 else 1
    out = preprocess(rng.normal(size=shape), PreprocessSpec(kind="timeseries", series_length=64))  # rocket
    assert out.shape == (channels, 64) and out.dtype == np.float32


@pytest.mark.parametrize("encoding", ["rocket", "spectrogram", "raw"])
def test_timeseries_ignores_offset_and_scale_per_channel(encoding):
    spec = PreprocessSpec(kind="timeseries", image_size=16, encoding=encoding)
    x = rng.normal(size=(100, 3))
    shifted = x * np.array([1.0, 9.81, 0.01]) + np.array([0.0, 9.81, -3.0])  # units and gravity
    np.testing.assert_allclose(preprocess(x, spec), preprocess(shifted, spec), atol=1e-3)


def test_timeseries_constant_channel_is_finite():
    spec = PreprocessSpec(kind="timeseries", image_size=16, encoding="spectrogram")
    x = np.stack([np.ones(80), rng.normal(size=80)], axis=1)
    check_image_like(preprocess(x, spec), 16)
    assert np.isfinite(preprocess(x, PreprocessSpec(kind="timeseries"))).all()


def test_timeseries_rejects_3d():
    with pytest.raises(ValueError):
        preprocess(np.zeros((4, 5, 6)), PreprocessSpec(kind="timeseries"))


def test_vector_passes_through_as_float32():
    x = np.arange(12, dtype=np.int64).reshape(3, 4)
    out = preprocess(x, PreprocessSpec(kind="vector"))
    assert out.shape == (12,) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.arange(12, dtype=np.float32))


def test_preprocess_batch_stacks():
    spec = PreprocessSpec(kind="audio", image_size=16)
    clips = [rng.normal(size=n) for n in (1000, 8000, 12000)]
    batch = preprocess_batch(clips, spec)
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
    for clip, row in zip(clips, batch):
        np.testing.assert_array_equal(row, preprocess(clip, spec))


def test_spec_round_trip():
    spec = PreprocessSpec(kind="audio", image_size=48, sample_rate=16000, clip_seconds=0.5, n_mels=40,
                          options={"backbone": "tiny-cnn"})
    d = spec.to_dict()
    assert d["kind"] == "audio" and d["n_mels"] == 40 and d["options"] == {"backbone": "tiny-cnn"}
    back = PreprocessSpec.from_dict(d)
    assert back == spec
    assert back.digest() == spec.digest()
    assert PreprocessSpec.from_dict({**d, "added_in_a_later_version": 1}) == spec


@pytest.mark.parametrize("change", [
    {"image_size": 64}, {"sample_rate": 16000}, {"clip_seconds": 2.0}, {"n_mels": 32}, {"n_fft": 512},
    {"hop": 32}, {"series_length": 256}, {"kind": "image"}, {"options": {"backbone": "tiny-cnn"}},
])
def test_digest_changes_with_every_option(change):
    base = PreprocessSpec(kind="audio")
    other = PreprocessSpec.from_dict({**base.to_dict(), **change})
    assert other.digest() != base.digest()
    assert PreprocessSpec.from_dict(base.to_dict()).digest() == base.digest()


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown modality kind"):
        PreprocessSpec(kind="lidar")
    assert set(KINDS) == {"image", "audio", "timeseries", "video", "vector", "text"}


@pytest.mark.parametrize("shape", [(16, 64, 64), (1, 8, 8), (3, 5, 7), (40, 4)])
def test_running_sum_is_cumsum_bit_for_bit(shape):
    """The depth clip's motion history: frame-by-frame sums must equal numpy's cumsum exactly, so
    taps cached before the change and the runtime's preprocessing stay the same."""
    from mmcl_edge.preprocess import running_sum

    x = (np.random.default_rng(sum(shape)).random(shape, dtype=np.float32) * 1000).astype(np.float32)
    assert np.array_equal(running_sum(x), np.cumsum(x, axis=0))
    assert running_sum(x[:0]).shape == x[:0].shape


@pytest.mark.parametrize("length", [1, 7, 129, 300, 8000, 8257])
def test_stft_power_is_the_windowed_fft_of_every_hop(length):
    """The strided frames give, bit for bit, the power of the Hann-windowed FFT of each frame taken
    one by one from the centre-padded signal."""
    from mmcl_edge.preprocess import stft_power

    n_fft, hop = 256, 64
    x = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    padded = np.pad(x, n_fft // 2, mode="reflect" if length > n_fft // 2 else "constant")
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    starts = range(0, len(padded) - n_fft + 1, hop)
    expected = np.stack([np.abs(np.fft.rfft(padded[s:s + n_fft] * window)) ** 2 for s in starts], axis=1)
    got = stft_power(x, n_fft, hop)
    assert got.shape == expected.shape == (n_fft // 2 + 1, 1 + (len(padded) - n_fft) // hop)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_depth_clip_scaling_in_place_is_the_formula_bit_for_bit():
    """Readings scaled into [0.2, 1] over the clip's valid range, holes (0, negative, NaN) at 0 and
    the motion channels from those frames: the in-place arithmetic gives exactly the written formula."""
    from mmcl_edge.preprocess import _MEAN, _STD, running_sum, video

    rng = np.random.default_rng(3)
    x = rng.integers(0, 4000, (12, 40, 50)).astype(np.float32)
    x[x < 900] = 0
    x[0, 0, :4] = np.nan
    x[1, 1, :4] = -5
    spec = PreprocessSpec(kind="video", frames=12, image_size=32)
    valid = x > 0
    lo, hi = float(x[valid].min()), float(x[valid].max())
    scaled = np.where(valid, 0.2 + 0.8 * (x - lo) / (hi - lo), 0.0).astype(np.float32)
    frames = resize_2d(scaled, 32, 32)
    diff = np.abs(np.diff(frames, axis=0, prepend=frames[:1]))
    history = running_sum(diff)
    channels = np.stack([frames, diff / max(float(diff.max()), 1e-6), history / max(float(history.max()), 1e-6)], axis=1)
    expected = ((np.clip(channels, 0.0, 1.0) - _MEAN) / _STD).astype(np.float32)
    before = x.copy()
    got = video(x, spec)
    assert got.dtype == np.float32 and got.shape == (12, 3, 32, 32)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(x, before)  # the caller's clip is not changed in place
