"""Reading raw inputs from files for ``mmcl-edge predict`` (numpy + the standard library)."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from mmcl_edge.runtime.errors import InputError


def read_npz(path: Path, modalities: list[str]) -> dict[str, np.ndarray]:
    """A generic-format ``.npz``: arrays ``x_<modality>`` with a leading sample axis. A modality it
    lacks is absent from every sample (the runtime decides whether the pack can answer without it)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc})") from None
    if not any(f"x_{m}" in arrays for m in modalities):
        raise InputError(f"{path} holds none of {', '.join('x_' + m for m in modalities)} "
                         f"(it holds {', '.join(sorted(arrays)) or 'nothing'})")
    return {m: arrays[f"x_{m}"] for m in modalities if f"x_{m}" in arrays}


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform (channels averaged) and its sample rate."""
    try:
        import soundfile  # any format/bit depth, if installed

        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        return data.mean(axis=1), int(rate)
    except ImportError:
        pass
    with wave.open(str(path), "rb") as w:  # PCM WAV without extra packages
        width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = np.frombuffer(w.readframes(w.getnframes()), dtype={1: np.uint8, 2: np.int16, 4: np.int32}[width])
    x = raw.astype(np.float32)
    x = (x - 128) / 128 if width == 1 else x / float(2 ** (8 * width - 1))
    return x.reshape(-1, channels).mean(axis=1), int(rate)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample a mono waveform: windowed-sinc low-pass below the new Nyquist, then linear interpolation."""
    if rate == target or len(x) == 0:
        return x.astype(np.float32)
    if target < rate:  # anti-aliasing
        cutoff = 0.5 * target / rate
        taps = 63
        n = np.arange(taps) - (taps - 1) / 2
        h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(taps)
        x = np.convolve(x, (h / h.sum()).astype(np.float32), mode="same")
    n_out = max(1, int(round(len(x) * target / rate)))
    t = np.arange(n_out) * (rate / target)
    return np.interp(t, np.arange(len(x)), x).astype(np.float32)


def read_sample(path: Path, spec=None) -> np.ndarray:
    """One sample from a ``.wav``, image (``.png``/``.jpg``, needs Pillow), ``.npy`` or ``.csv``.

    A WAV is read at its own sample rate (from its header) and resampled to the modality's
    ``spec.sample_rate`` when a spec is given; stereo is mixed down to mono.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".wav":
            x, rate = _read_wav(path)
            target = getattr(spec, "sample_rate", None) if spec is not None and spec.kind == "audio" else None
            if target and rate <= 0:
                raise InputError(f"{path}: the WAV header gives no sample rate")
            return resample(x, rate, int(target)) if target else x
        if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
            try:
                from PIL import Image
            except ImportError:
                raise InputError("reading .png/.jpg images needs Pillow: pip install 'mmcl-edge[images]' "
                                 "(or pillow); or pass the image as a .npy array") from None
            return np.asarray(Image.open(path).convert("RGB") if Image.open(path).mode not in ("L", "I", "F")
                              else Image.open(path), dtype=np.float32)
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".csv":
            return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=1)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    raise InputError(f"{path}: unknown input type {suffix!r}; use .npz, .wav, .png/.jpg, .npy or .csv")
