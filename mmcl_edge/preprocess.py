"""Preprocessing per modality kind, in numpy only.

The torch-free runtime imports this very module, so what the learner saw during training is what
the device computes at inference: one implementation, no drift. Every kind ends as a float32
array shaped like its backbone's input (``[3, S, S]`` images for the CNN, ``[D]`` vectors).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

KINDS = ("image", "audio", "timeseries", "vector")


@dataclass(frozen=True)
class PreprocessSpec:
    """How one modality is turned into a backbone input; serialised into workspaces and packs."""

    kind: str
    image_size: int = 96
    sample_rate: int = 8000
    clip_seconds: float = 1.0
    n_mels: int = 64
    n_fft: int = 256
    hop: int = 64
    series_length: int = 128
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown modality kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


# ImageNet normalisation of the EfficientNet-Lite checkpoints: (x*255 - 127) / 128 for x in [0, 1].
_MEAN, _STD = 127.0 / 255.0, 128.0 / 255.0


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Linear-interpolation weights (align_corners=False), so resizing is two small matmuls."""
    scale = n_in / n_out
    pos = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def resize_2d(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of the last two axes."""
    rows = _interp_matrix(x.shape[-2], height)
    cols = _interp_matrix(x.shape[-1], width)
    return (rows @ x.astype(np.float32) @ cols.T).astype(np.float32)


def _to_backbone_image(gray01: np.ndarray, size: int) -> np.ndarray:
    img = resize_2d(gray01, size, size)
    img = (np.clip(img, 0.0, 1.0) - _MEAN) / _STD
    return np.repeat(img[None], 3, axis=0).astype(np.float32)


def image(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Grey ``[H, W]`` or colour ``[H, W, C]``/``[C, H, W]`` image, any numeric range -> ``[3, S, S]``."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        channel_axis = 0 if x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4) else -1
        x = np.moveaxis(x, channel_axis, 0)[:3]
        if x.shape[0] == 3:
            x = np.stack([resize_2d(c, spec.image_size, spec.image_size) for c in x])
            lo, hi = float(x.min()), float(x.max())
            x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
            return ((x - _MEAN) / _STD).astype(np.float32)
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"an image must be 2-D or 3-D, got shape {x.shape}")
    lo, hi = float(x.min()), float(x.max())
    gray = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return _to_backbone_image(gray, spec.image_size)


@functools.lru_cache(maxsize=16)
def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2)
    bins = mel_to_hz(mels) / (sample_rate / 2) * (n_fft // 2)
    freqs = np.arange(n_fft // 2 + 1)
    fb = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    for i in range(n_mels):
        left, centre, right = bins[i], bins[i + 1], bins[i + 2]
        up = (freqs - left) / max(centre - left, 1e-6)
        down = (right - freqs) / max(right - centre, 1e-6)
        fb[i] = np.maximum(0.0, np.minimum(up, down))
    return fb


def stft_power(signal: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Power spectrogram ``[n_fft//2+1, frames]`` with a Hann window (centre-padded)."""
    signal = np.pad(signal.astype(np.float32), n_fft // 2, mode="reflect" if len(signal) > n_fft // 2 else "constant")
    frames = 1 + max(0, (len(signal) - n_fft) // hop)
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    spec = np.fft.rfft(signal[idx] * window, axis=1)
    return (np.abs(spec) ** 2).T.astype(np.float32)


def log_mel(wave: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Log-mel spectrogram ``[n_mels, frames]`` of a clip cropped/padded to ``clip_seconds``."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    n = int(round(spec.sample_rate * spec.clip_seconds))
    if len(wave) >= n:
        start = (len(wave) - n) // 2
        wave = wave[start:start + n]
    else:
        left = (n - len(wave)) // 2
        wave = np.pad(wave, (left, n - len(wave) - left))
    peak = float(np.abs(wave).max())
    if peak > 0:
        wave = wave / peak
    power = stft_power(wave, spec.n_fft, spec.hop)
    mel = _mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels) @ power
    return np.log(mel + 1e-6).astype(np.float32)


def audio(wave: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Mono waveform -> log-mel image (low frequencies at the bottom) -> ``[3, S, S]``."""
    mel = log_mel(wave, spec)
    top = float(mel.max())
    mel = np.clip(mel, top - 80.0 * np.log(10) / 10, top)  # an 80 dB dynamic range
    lo = float(mel.min())
    gray = (mel - lo) / (top - lo) if top > lo else np.zeros_like(mel)
    return _to_backbone_image(gray[::-1].copy(), spec.image_size)


def timeseries(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Multichannel sensor series ``[T, C]`` (or ``[T]``) -> stacked per-channel log-spectrograms.

    Each channel is resampled to ``series_length`` steps and standardised (so units and offsets
    such as gravity on an accelerometer do not matter), turned into a log-power spectrogram, and
    the channels' spectrograms are stacked top to bottom into one image for the image backbone:
    a pre-trained CNN then sees rhythm and frequency content per channel, which is what tells
    activities and gestures apart in IMU data.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"a timeseries sample must be [T] or [T, C], got shape {x.shape}")
    length = spec.series_length
    x = (_interp_matrix(x.shape[0], length) @ x).T  # [C, length]
    x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-6)
    n_fft = min(32, length)
    rows = []
    for channel in x:
        p = np.log(stft_power(channel, n_fft, max(1, n_fft // 4)) + 1e-4)
        rows.append(p[::-1])
    img = np.concatenate(rows, axis=0)
    lo, hi = float(img.min()), float(img.max())
    gray = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return _to_backbone_image(gray, spec.image_size)


def vector(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Feature vectors pass through as float32 (flattened)."""
    return np.asarray(x, dtype=np.float32).reshape(-1)


_FUNCTIONS = {"image": image, "audio": audio, "timeseries": timeseries, "vector": vector}


def preprocess(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Preprocess one raw sample of the given kind."""
    return _FUNCTIONS[spec.kind](x, spec)


def preprocess_batch(samples, spec: PreprocessSpec) -> np.ndarray:
    """Preprocess a sequence of raw samples into one stacked float32 batch."""
    return np.stack([preprocess(s, spec) for s in samples]).astype(np.float32)
