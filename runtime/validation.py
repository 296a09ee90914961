"""Checks on what ``Runtime.predict`` is given, all before any preprocessing or inference.

Every refusal is an ``InputError`` that names the modality, the sample and the problem. The limits
bound the work one request can cause (defaults in ``Limits``; pass ``limits=Limits(...)`` or the
keyword arguments of ``Runtime`` to change them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmcl_edge.errors import InputError

# raw sample dimensions per kind: a sample has this many axes, a batch one more
SAMPLE_NDIM = {"audio": 1, "vector": 1, "timeseries": 2, "image": 2, "video": 3}
CHANNELS = (1, 3, 4)


@dataclass(frozen=True)
class Limits:
    """Bounds on one ``predict`` request, enforced before any work is done."""

    max_batch: int = 256                  # samples per request
    max_image_pixels: int = 4096 * 4096   # height x width of one image (16.8 MP)
    max_audio_seconds: float = 60.0       # at the modality's sample rate
    max_series_steps: int = 1_000_000     # time steps of one sensor series
    max_values: int = 1 << 24             # numbers in one sample of the other kinds (vectors, series, audio)
    max_text_chars: int = 100_000         # characters of one text (tokenised texts are cut at max_tokens anyway)


def check_container(inputs) -> None:
    if not isinstance(inputs, dict):
        raise InputError(f"predict expects a dict {{modality: sample or batch}}, got {type(inputs).__name__}")


def _array(modality: str, x, where: str) -> np.ndarray:
    if x is None:
        raise InputError(f"{modality}: {where} is None")
    try:
        a = np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged nested lists ...
        raise InputError(f"{modality}: {where} is not a numeric array ({exc})") from None
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise InputError(f"{modality}: {where} must be numeric, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise InputError(f"{modality}: {where} must be real-valued, got dtype {a.dtype}")
    if a.size == 0:
        raise InputError(f"{modality}: {where} is empty (shape {a.shape})")
    return a


def _check_image_sample(modality: str, a: np.ndarray, where: str) -> None:
    if a.ndim == 3:
        first, last = a.shape[0] in CHANNELS, a.shape[-1] in CHANNELS
        if a.shape[-1] == 2 or (a.shape[0] == 2 and not last):
            raise InputError(f"{modality}: {where} has 2 channels (shape {a.shape}); give a grey [H, W] or a "
                             "colour [H, W, 3] image")
        if not (first or last):
            raise InputError(f"{modality}: {where} has shape {a.shape}; an image is [H, W], [H, W, C] or "
                             "[C, H, W] with C in 1, 3, 4")
    elif a.ndim != 2:
        raise InputError(f"{modality}: {where} must be a 2-D or 3-D image, got shape {a.shape}")


def split_text(modality: str, x) -> tuple[list[str], bool]:
    """A text modality: one string (or UTF-8 bytes), or a batch (a list, or a unicode/bytes array [N])."""
    def one(s, where: str) -> str:
        if isinstance(s, np.ndarray) and s.ndim == 0:
            s = s.item()
        if isinstance(s, (bytes, bytearray)):
            return bytes(s).decode("utf-8", errors="replace")
        if not isinstance(s, str):
            raise InputError(f"{modality}: {where} must be a string (text), got {type(s).__name__}")
        return s

    if isinstance(x, np.ndarray) and x.ndim == 1 and x.dtype.kind in "USO":
        x = list(x)
    if isinstance(x, (list, tuple)):
        if not x:
            raise InputError(f"{modality}: the batch is empty")
        return [one(s, f"sample {i}") for i, s in enumerate(x)], False
    if x is None:
        raise InputError(f"{modality}: the input is None")
    return [one(x, "the input")], True


def split(modality: str, kind: str, x) -> tuple[list[np.ndarray], bool]:
    """One sample or a batch -> (list of samples, given as one sample?), layouts checked."""
    if kind == "text":
        return split_text(modality, x)
    if isinstance(x, (list, tuple)):
        if not x:
            raise InputError(f"{modality}: the batch is empty")
        samples = [_array(modality, s, f"sample {i}") for i, s in enumerate(x)]
        for i, s in enumerate(samples):
            _check_sample_ndim(modality, kind, s, f"sample {i}")
        return samples, False
    a = _array(modality, x, "the input")
    base = SAMPLE_NDIM.get(kind)
    if base is None:  # a kind this validator does not know: the plain rule
        return [a], True
    if kind == "image":
        if a.ndim == 2:
            return [a], True
        if a.ndim == 3:
            first, last = a.shape[0] in CHANNELS, a.shape[-1] in CHANNELS
            if last and not first:
                _check_image_sample(modality, a, "the image")
                return [a], True
            if first and not last:
                raise InputError(f"{modality}: shape {a.shape} is ambiguous: one channels-first image [C, H, W] "
                                 f"or a batch of {a.shape[0]} grey images? Give one image as [H, W, C], or a "
                                 "batch as a list of images or a 4-D array")
            if a.shape[-1] == 2:
                raise InputError(f"{modality}: shape {a.shape} has 2 channels; give a grey [H, W] or a colour "
                                 "[H, W, 3] image")
            if last and first:
                _check_image_sample(modality, a, "the image")
                return [a], True  # [3, W, 3] and the like: taken as [H, W, C]
            return list(a), False  # [N, H, W]: a batch of grey images
        if a.ndim == 4:
            samples = list(a)
            _check_image_sample(modality, samples[0], "each image")
            return samples, False
        raise InputError(f"{modality} (image): expected [H, W], [H, W, C], or a batch [N, H, W(, C)], "
                         f"got shape {a.shape}")
    if kind == "video":
        if a.ndim == 3 or (a.ndim == 4 and a.shape[-1] in CHANNELS):  # [F, H, W] or [F, H, W, C]
            _check_sample_ndim(modality, kind, a, "the clip")
            return [a], True
        if a.ndim in (4, 5):
            samples = list(a)
            _check_sample_ndim(modality, kind, samples[0], "each clip")
            return samples, False
        raise InputError(f"{modality} (video): expected a clip [F, H, W] or [F, H, W, C], or a batch of them, "
                         f"got shape {a.shape}")
    if kind == "timeseries" and a.ndim == 1:
        return [a], True
    if a.ndim == base:
        return [a], True
    if a.ndim == base + 1:
        return list(a), False
    raise InputError(f"{modality} ({kind}): expected one sample with {base} axes or a batch with {base + 1}, "
                     f"got shape {a.shape}")


def _check_sample_ndim(modality: str, kind: str, a: np.ndarray, where: str) -> None:
    if kind == "image":
        _check_image_sample(modality, a, where)
    elif kind == "audio" and a.ndim != 1:
        raise InputError(f"{modality}: {where} must be a mono waveform [T], got shape {a.shape} "
                         "(mix stereo down first)")
    elif kind == "timeseries" and a.ndim not in (1, 2):
        raise InputError(f"{modality}: {where} must be [T] or [T, C], got shape {a.shape}")
    elif kind == "video" and not (a.ndim == 3 or (a.ndim == 4 and a.shape[-1] in CHANNELS)):
        raise InputError(f"{modality}: {where} must be a clip [F, H, W] or [F, H, W, C] with C in 1, 3, 4, "
                         f"got shape {a.shape}")
    elif kind == "vector" and a.ndim != 1:
        raise InputError(f"{modality}: {where} must be a vector [D], got shape {a.shape}")


def check_batch(modality: str, kind: str, samples: list[np.ndarray], spec, limits: Limits) -> None:
    """Size limits first (cheap), then finiteness of every value."""
    if len(samples) > limits.max_batch:
        raise InputError(f"{modality}: {len(samples)} samples in one request; the limit is {limits.max_batch} "
                         "(split the batch, or raise max_batch)")
    if kind == "text":
        for i, s in enumerate(samples):
            if len(s) > limits.max_text_chars:
                raise InputError(f"{modality}: sample {i} has {len(s)} characters; the limit is "
                                 f"{limits.max_text_chars} (raise max_text_chars to allow more)")
        return
    for i, s in enumerate(samples):
        if kind != "image" and s.size > limits.max_values:
            raise InputError(f"{modality}: sample {i} holds {s.size} values; the limit is {limits.max_values}")
        if kind == "image":
            hw = (s.shape[1] * s.shape[2] if s.ndim == 3 and s.shape[0] in CHANNELS and s.shape[-1] not in CHANNELS
                  else s.shape[0] * s.shape[1])
            if hw > limits.max_image_pixels:
                raise InputError(f"{modality}: sample {i} has {hw} pixels; the limit is {limits.max_image_pixels} "
                                 "(resize it first, or raise max_image_pixels)")
        elif kind == "audio":
            rate = getattr(spec, "sample_rate", 8000)
            if s.shape[0] > limits.max_audio_seconds * rate:
                raise InputError(f"{modality}: sample {i} is {s.shape[0] / rate:.1f} s at {rate} Hz; the limit is "
                                 f"{limits.max_audio_seconds:g} s (raise max_audio_seconds to allow more)")
        elif kind == "timeseries" and s.shape[0] > limits.max_series_steps:
            raise InputError(f"{modality}: sample {i} has {s.shape[0]} time steps; the limit is "
                             f"{limits.max_series_steps}")
    for i, s in enumerate(samples):
        if np.issubdtype(s.dtype, np.floating) and not np.isfinite(s).all():
            what = "NaN" if np.isnan(s).any() else "infinite"
            raise InputError(f"{modality}: sample {i} contains {what} values; the runtime serves finite inputs only")
