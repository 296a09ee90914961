"""A pack on disk and its validation: nothing may serve until every check here has passed."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcl_edge.runtime import providers as prov
from mmcl_edge.runtime.errors import PackRejected

PACK_SCHEMA = "mmcl-edge.pack/1"
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "pack.onnx"
WEIGHTS_FILE = "weights.safetensors"
CURRENT_FILE = "current"
PRESENT_INPUT = "present"   # [B, M] graph input: 1 where a sample has the modality (packs since v0.2)

# key -> type the manifest must hold
REQUIRED = {"schema": str, "version": int, "task": int, "setting": str, "classes": list, "label_names": list,
            "inputs": list, "outputs": dict, "preprocess": dict, "backbones": dict, "created": str,
            "files": dict, "sha256": str}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack_digest(manifest: dict) -> str:
    """The pack's own sha256: over its manifest (minus this field), which holds every file's sha256."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(folder: Path) -> dict:
    """Load and check a pack's manifest and files; raises ``PackRejected`` with the reason."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise PackRejected(f"{folder} is not a pack: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackRejected(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise PackRejected(f"{path} must hold a JSON object")
    for key, typ in REQUIRED.items():
        if key not in manifest:
            raise PackRejected(f"{path}: field {key!r} is missing")
        if not isinstance(manifest[key], typ):
            raise PackRejected(f"{path}: field {key!r} must be a {typ.__name__}")
    if manifest["schema"] != PACK_SCHEMA:
        raise PackRejected(f"{path}: schema {manifest['schema']!r} is not {PACK_SCHEMA!r}")
    if len(manifest["classes"]) != len(manifest["label_names"]) or not manifest["classes"]:
        raise PackRejected(f"{path}: classes and label_names must be non-empty and of equal length")
    if pack_digest(manifest) != manifest["sha256"]:
        raise PackRejected(f"{path}: the manifest does not match its sha256 (edited or corrupt)")
    for name in (ONNX_FILE, WEIGHTS_FILE):
        if name not in manifest["files"]:
            raise PackRejected(f"{path}: no sha256 recorded for {name}")
        file = folder / name
        if not file.is_file():
            raise PackRejected(f"{folder}: {name} is missing")
        if sha256_file(file) != manifest["files"][name]:
            raise PackRejected(f"{folder}: {name} does not match the sha256 in its manifest (corrupt or truncated)")
    return manifest


@dataclass
class Pack:
    """A validated, warmed pack, ready to serve."""

    folder: Path
    manifest: dict
    session: object
    input_names: list[str]          # the taps the graph reads
    modalities: list[str]           # order of the ``present`` columns
    handles_missing: bool = False   # the graph has a ``present`` input (a modality may be absent)

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def label_names(self) -> list[str]:
        return self.manifest["label_names"]

    def run(self, taps: dict[str, np.ndarray], present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits and fused embedding; ``present`` ([B, M] in ``modalities`` order) defaults to all."""
        feeds = {n: taps[n] for n in self.input_names}
        if self.handles_missing:
            batch = len(next(iter(feeds.values())))
            feeds[PRESENT_INPUT] = (np.ones((batch, len(self.modalities)), np.float32) if present is None
                                    else np.ascontiguousarray(present, dtype=np.float32))
        logits, fused = self.session.run(["logits", "fused"], feeds)
        return logits, fused


def load_pack(folder: Path, backbones: dict[str, dict], providers: list[str], threads: int = 0) -> Pack:
    """Validate ``folder`` against the loaded backbones, build its session and warm it up.

    ``backbones`` maps modality -> the backbone index entry (identity and taps) of what is loaded.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    mine = {m: e["identity"] for m, e in backbones.items()}
    if manifest["backbones"] != mine:
        raise PackRejected(f"{folder}: trained against backbones {manifest['backbones']}, but this runtime "
                           f"serves {mine}; export the pack from a workspace with the same backbones")
    expected = [{"name": f"{m}__{t['name']}", "shape": [None, t["tokens"], t["dim"]]}
                for m, e in backbones.items() for t in e["taps"]]
    declared = [{"name": i.get("name"), "shape": i.get("shape")} for i in manifest["inputs"]]
    if sorted(declared, key=lambda d: d["name"]) != sorted(expected, key=lambda d: d["name"]):
        raise PackRejected(f"{folder}: its inputs {declared} do not match the backbones' taps {expected}")
    try:
        session = prov.session(folder / ONNX_FILE, providers, threads)
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise PackRejected(f"{folder}: {ONNX_FILE} cannot be loaded by onnxruntime ({exc})") from None
    names = [i.name for i in session.get_inputs()]
    handles_missing = PRESENT_INPUT in names
    tap_names = [n for n in names if n != PRESENT_INPUT]
    if sorted(tap_names) != sorted(d["name"] for d in expected):
        raise PackRejected(f"{folder}: the ONNX graph's inputs {names} are not the declared ones")
    if {o.name for o in session.get_outputs()} != {"logits", "fused"}:
        raise PackRejected(f"{folder}: the ONNX graph must output 'logits' and 'fused'")
    modalities = manifest.get("modalities") or list(backbones)
    if handles_missing and sorted(modalities) != sorted(backbones):
        raise PackRejected(f"{folder}: its modalities {modalities} are not the backbones' {list(backbones)}")
    pack = Pack(folder, manifest, session, tap_names, list(modalities), handles_missing)
    _warm_up(pack, backbones)
    return pack


def _warm_up(pack: Pack, backbones: dict[str, dict]) -> None:
    """One inference on plausible taps: outputs must be finite and of the declared shapes."""
    rng = np.random.default_rng(0)
    taps = {f"{m}__{t['name']}": np.abs(rng.standard_normal((2, t["tokens"], t["dim"]))).astype(np.float32)
            for m, e in backbones.items() for t in e["taps"]}
    try:
        logits, fused = pack.run(taps)
        if pack.handles_missing and len(pack.modalities) > 1:  # a sample missing its first modality
            present = np.ones((2, len(pack.modalities)), np.float32)
            present[0, 0] = 0.0
            more = pack.run(taps, present)
            logits, fused = np.concatenate([logits, more[0]]), np.concatenate([fused, more[1]])
    except Exception as exc:
        raise PackRejected(f"{pack.folder}: warm-up inference failed ({exc})") from None
    n = len(pack.manifest["classes"])
    if logits.shape[1:] != (n,):
        raise PackRejected(f"{pack.folder}: warm-up logits have shape {logits.shape[1:]} per batch, expected ({n},)")
    if not (np.isfinite(logits).all() and np.isfinite(fused).all()):
        raise PackRejected(f"{pack.folder}: warm-up inference gave non-finite outputs")
