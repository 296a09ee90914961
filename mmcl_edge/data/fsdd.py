"""The Free Spoken Digit Dataset: locate it (never an implicit download), read it, or fetch it
when the user explicitly asks (``mmcl-edge data download-fsdd``)."""
from __future__ import annotations

import io
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcl_edge.data.dataset import DataFormatError

ENV_VAR = "MMCL_EDGE_DATA"
FSDD_ARCHIVE = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/heads/master.zip"
_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


@dataclass
class Clip:
    wave: np.ndarray
    digit: int
    speaker: str
    index: int


def locate_fsdd(data_dir: str | os.PathLike | None = None) -> Path:
    """Find the folder of FSDD WAV files: ``data_dir``, else ``$MMCL_EDGE_DATA``.

    Either may point at the recordings folder itself or at a folder holding ``fsdd/recordings``
    or ``recordings``.
    """
    given = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    if not given:
        raise DataFormatError(
            "AV-Digits needs the Free Spoken Digit Dataset (FSDD) recordings. Point to them with "
            f"--data-dir PATH or the environment variable {ENV_VAR}=PATH, or fetch them once with "
            "'mmcl-edge data download-fsdd --to PATH'.")
    root = Path(given).expanduser()
    for candidate in (root, root / "recordings", root / "fsdd" / "recordings"):
        if candidate.is_dir() and any(_NAME.match(p.name) for p in candidate.glob("*.wav")):
            return candidate
    raise DataFormatError(f"no FSDD recordings (files like 3_theo_12.wav) found in {root}")


def read_fsdd(folder: Path) -> list[Clip]:
    import soundfile as sf

    clips = []
    for path in sorted(folder.glob("*.wav")):
        m = _NAME.match(path.name)
        if not m:
            continue
        wave, _ = sf.read(str(path), dtype="float32", always_2d=False)
        if wave.ndim > 1:
            wave = wave.mean(axis=1)
        clips.append(Clip(wave, int(m.group(1)), m.group(2), int(m.group(3))))
    if not clips:
        raise DataFormatError(f"no readable FSDD clips in {folder}")
    return clips


def download_fsdd(dest: str | os.PathLike) -> Path:
    """Download FSDD (CC BY-SA 4.0) into ``dest/recordings``. Only ever called on request."""
    dest = Path(dest).expanduser()
    target = dest / "recordings"
    target.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(FSDD_ARCHIVE, timeout=120) as resp:
            archive = zipfile.ZipFile(io.BytesIO(resp.read()))
    except (OSError, zipfile.BadZipFile) as exc:  # URLError is an OSError
        raise DataFormatError(f"could not download FSDD from {FSDD_ARCHIVE}: {exc}. Download it by hand and "
                              "point --data-dir or MMCL_EDGE_DATA at its recordings/ folder") from None
    for member in archive.namelist():
        name = member.rsplit("/", 1)[-1]
        if "/recordings/" in member and _NAME.match(name):
            (target / name).write_bytes(archive.read(member))
    return target
