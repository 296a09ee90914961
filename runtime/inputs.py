"""Reading raw inputs from files for ``mmcl-edge predict`` (numpy + the standard library)."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from mmcl_edge.runtime.errors import InputError
from mmcl_edge.runtime.npz import NpzReader, read_npy
from mmcl_edge.runtime.validation import Limits


def read_npz(path: Path, modalities: list[str]) -> dict[str, np.ndarray]:
    """A generic-format ``.npz``: arrays ``x_<modality>`` with a leading sample axis (only those are
    read, each size-checked first: ``runtime.npz``). A modality it lacks is absent from every sample
    (the runtime decides whether the pack can answer without it)."""
    with NpzReader(path, InputError) as z:
        wanted = [m for m in modalities if f"x_{m}" in z.names]
        if not wanted:
            raise InputError(f"{path} holds none of {', '.join('x_' + m for m in modalities)} "
                             f"(it holds {', '.join(sorted(z.names)) or 'nothing'})")
        return {m: z.read(f"x_{m}") for m in wanted}


def _wav_header(path: Path) -> tuple[int, int, int]:
    """(frames, channels, sample rate) as the file declares them, nothing else read."""
    try:
        import soundfile  # any format/bit depth, if installed

        info = soundfile.info(str(path))
        return int(info.frames), int(info.channels), int(info.samplerate)
    except ImportError:
        pass
    with wave.open(str(path), "rb") as w:
        return w.getnframes(), w.getnchannels(), w.getframerate()


def text_argument(value: str) -> str:
    """A text modality on the command line: the string itself, or ``@FILE`` for a UTF-8 text file."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    if not path.is_file():
        raise InputError(f"text file {path} does not exist (a text value starting with @ names a file)")
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform (channels averaged) and its sample rate."""
    try:
        import soundfile

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


def _check_wav(path: Path, target: int | None, limits: Limits) -> None:
    """The header decides nothing: its declared length, and the length after resampling, are checked
    against the limits before a sample is read (a 16 KB file declaring 1 Hz would become 64 M samples)."""
    frames, channels, rate = _wav_header(path)
    if rate <= 0 or channels <= 0:
        raise InputError(f"{path}: the WAV header declares {rate} Hz and {channels} channels")
    if frames * channels > limits.max_values:
        raise InputError(f"{path}: the WAV declares {frames} frames of {channels} channels; the limit is "
                         f"{limits.max_values} values")
    if target and frames / rate > limits.max_audio_seconds:
        raise InputError(f"{path}: the WAV declares {frames} frames at {rate} Hz ({frames / rate:.1f} s); the limit "
                         f"is {limits.max_audio_seconds:g} s (raise max_audio_seconds to allow more)")


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


def read_sample(path: Path, spec=None, limits: Limits | None = None) -> np.ndarray:
    """One sample from a ``.wav``, image (``.png``/``.jpg``, needs Pillow), ``.npy`` or ``.csv``.

    A WAV is read at its own sample rate (from its header) and resampled to the modality's
    ``spec.sample_rate`` when a spec is given; stereo is mixed down to mono. A WAV's declared length
    and an image's declared size are checked against ``limits`` before the file is decoded.
    """
    path = Path(path)
    limits = limits or Limits()
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".wav":
            target = getattr(spec, "sample_rate", None) if spec is not None and spec.kind == "audio" else None
            _check_wav(path, int(target) if target else None, limits)
            x, rate = _read_wav(path)
            return resample(x, rate, int(target)) if target else x
        if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
            try:
                from PIL import Image
            except ImportError:
                raise InputError("reading .png/.jpg images needs Pillow: pip install 'mmcl-edge[images]' "
                                 "(or pillow); or pass the image as a .npy array") from None
            with Image.open(path) as im:  # the header only, until the size is known to fit
                w, h = im.size
                if w * h > limits.max_image_pixels:
                    raise InputError(f"{path}: {w} x {h} pixels; the limit is {limits.max_image_pixels} "
                                     "(resize it first, or raise max_image_pixels)")
                return np.asarray(im.convert("RGB") if im.mode not in ("L", "I", "F") else im, dtype=np.float32)
        if suffix == ".npy":
            return read_npy(path, InputError)
        if suffix == ".csv":
            return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=1)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    raise InputError(f"{path}: unknown input type {suffix!r}; use .npz, .wav, .png/.jpg, .npy or .csv")


def read_inputs(items: list[str], runtime, samples: str | None = None) -> dict[str, list[np.ndarray]]:
    """``predict --input`` values -> ``{modality: [sample, ...]}``, a list entry per sample in every
    form: one ``.npz`` (batch-first by definition, so ``[N, H, W]`` is N grey images; ``samples``,
    e.g. "3" or "0:10", picks some), or ``MODALITY=FILE`` per modality, each file one sample."""
    mods = runtime.backbones.modalities
    if len(items) == 1 and items[0].lower().endswith(".npz") and "=" not in items[0]:
        arrays = read_npz(Path(items[0]), mods)
        if samples is not None:
            try:
                lo, _, hi = samples.partition(":")
                pick = slice(int(lo or 0), int(hi) if hi else None) if ":" in samples else slice(int(lo), int(lo) + 1)
            except ValueError:
                raise InputError(f"--samples {samples!r}: use an index (3) or a range (0:10)") from None
            arrays = {m: x[pick] for m, x in arrays.items()}
        for m, x in arrays.items():
            if x.ndim == 0 or not len(x):
                raise InputError(f"x_{m} in {items[0]} holds no sample" +
                                 (f" (--samples {samples!r} selects none)" if samples is not None else ""))
        return {m: list(x) for m, x in arrays.items()}
    if samples is not None:
        raise InputError("--samples picks samples of a .npz input; a MODALITY=FILE input is one sample")
    inputs = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--input {item!r}: use MODALITY=FILE (modalities: {', '.join(mods)}) or one .npz")
        m, f = (part.strip() for part in item.split("=", 1))
        if m in inputs:
            raise InputError(f"--input names {m!r} twice; one file per modality")
        spec = runtime.backbones.specs.get(m)
        inputs[m] = [text_argument(f) if spec is not None and spec.kind == "text"
                     else read_sample(Path(f), spec, runtime.limits)]
    return inputs


def predict_all(runtime, inputs: dict[str, list[np.ndarray]]):
    """Every sample answered, in requests of at most ``runtime.limits.max_batch``, as one Prediction."""
    import dataclasses

    n = max(len(x) for x in inputs.values())
    step = runtime.limits.max_batch
    parts = [runtime.predict({m: x[b:b + step] for m, x in inputs.items()}) for b in range(0, n, step)]
    if len(parts) == 1:
        return parts[0]
    p = parts[0]
    per_sample = {f.name: np.concatenate([getattr(q, f.name) for q in parts]) for f in dataclasses.fields(p)
                  if isinstance(getattr(p, f.name), np.ndarray)}  # indices, scores, probabilities, novelty ...
    return dataclasses.replace(p, **per_sample, labels=[label for q in parts for label in q.labels],
                               timings_ms={k: sum(q.timings_ms[k] for q in parts) for k in p.timings_ms})
