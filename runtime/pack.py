"""A pack on disk and its validation: nothing may serve until every check here has passed."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmcl_edge.runtime import providers as prov
from mmcl_edge.runtime.errors import PackRejected
from mmcl_edge.runtime.graph_check import ALLOWED_OPS, check_graph_bytes
from mmcl_edge.runtime.layout import CURRENT_FILE  # noqa: F401  (re-exported: the on-disk contract lives in layout)
from mmcl_edge.runtime.trust import SIGNATURE_FILE

PACK_SCHEMA = "mmcl-edge.pack/1"
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "pack.onnx"
WEIGHTS_FILE = "weights.safetensors"   # optional (packs before 0.3): checked when listed
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


MAX_MANIFEST_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 512 << 20
MAX_WIDTH = 1 << 16          # a fused embedding or class count beyond this is not a pack of ours
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fields(path: Path, manifest: dict) -> None:
    """Types and values of the fields the runtime relies on (beyond their presence)."""
    if not _is_int(manifest["version"]) or not 0 <= manifest["version"] < 10 ** 9:
        raise PackRejected(f"{path}: 'version' must be an integer 0..999999999")
    if not _is_int(manifest["task"]) or manifest["task"] < 0:
        raise PackRejected(f"{path}: 'task' must be a non-negative integer")
    if not all(_is_int(c) for c in manifest["classes"]) or not all(isinstance(n, str) for n in manifest["label_names"]):
        raise PackRejected(f"{path}: 'classes' must hold integers and 'label_names' strings")
    if len(manifest["classes"]) != len(manifest["label_names"]) or not manifest["classes"]:
        raise PackRejected(f"{path}: classes and label_names must be non-empty and of equal length")
    if len(manifest["classes"]) > MAX_WIDTH:
        raise PackRejected(f"{path}: {len(manifest['classes'])} classes is beyond the limit of {MAX_WIDTH}")
    outs = manifest["outputs"]
    for name, want in (("logits", len(manifest["classes"])), ("fused", None)):
        shape = outs.get(name)
        if (not isinstance(shape, list) or len(shape) != 2 or shape[0] is not None or not _is_int(shape[1])
                or not 0 < shape[1] <= MAX_WIDTH or (want is not None and shape[1] != want)):
            raise PackRejected(f"{path}: outputs.{name} must be [null, n] with 0 < n <= {MAX_WIDTH}"
                               + (f" and n = {want} classes" if want is not None else "") + f", got {shape!r}")
    files = manifest["files"]
    for name, digest in files.items():
        if (not isinstance(name, str) or "/" in name or "\\" in name or name in (".", "..") or name.startswith(".")
                or name in (MANIFEST_FILE, SIGNATURE_FILE)):
            raise PackRejected(f"{path}: 'files' may list only plain file names in the pack, not {name!r}")
        if not isinstance(digest, str) or len(digest) != 64:
            raise PackRejected(f"{path}: 'files' must map each file to its sha256")


def check_safetensors(path: Path) -> dict:
    """Parse a safetensors file's header without loading it: a JSON header of sane tensors whose
    byte ranges tile the data exactly. Returns ``{name: (dtype, shape)}``."""
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise PackRejected(f"{path} is {size >> 20} MB; weights are limited to {MAX_WEIGHTS_BYTES >> 20} MB")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise PackRejected(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if not 2 <= n <= min(size - 8, 16 << 20):
            raise PackRejected(f"{path} is not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PackRejected(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise PackRejected(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    spans, tensors = [], {}
    for name, t in header.items():
        try:
            dtype, shape, (begin, end) = t["dtype"], t["shape"], t["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise PackRejected(f"{path}: tensor {name!r} has no dtype/shape/data_offsets") from None
        if dtype not in SAFETENSORS_DTYPES or not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise PackRejected(f"{path}: tensor {name!r} has an unsupported dtype or shape ({dtype!r}, {shape!r})")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end and end - begin == count * SAFETENSORS_DTYPES[dtype]):
            raise PackRejected(f"{path}: tensor {name!r} has data offsets that do not match its shape")
        spans.append((begin, end))
        tensors[name] = (dtype, shape)
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise PackRejected(f"{path}: tensors overlap or leave gaps in the data")
        pos = end
    if pos != size - 8 - n:
        raise PackRejected(f"{path}: the data section is {size - 8 - n} bytes, the header describes {pos}")
    return tensors


def read_manifest(folder: Path, contents: dict[str, bytes] | None = None) -> dict:
    """Load and check a pack's manifest and files; raises ``PackRejected`` with the reason.

    The folder must hold exactly the manifest, the files it lists (each a regular file, not a
    link, matching its sha256) and optionally ``signature.json``. ``contents``, when given,
    receives the graph's bytes exactly as they were hashed (so the bytes checked are the bytes
    loaded, and the file is read once).
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise PackRejected(f"{folder} is not a pack folder (missing, or a symbolic link)")
    path = folder / MANIFEST_FILE
    if not path.is_file() or path.is_symlink():
        raise PackRejected(f"{folder} is not a pack: {MANIFEST_FILE} is missing")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackRejected(f"{path} is larger than {MAX_MANIFEST_BYTES >> 10} KB")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
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
    _check_fields(path, manifest)
    try:
        digest = pack_digest(manifest)
    except (TypeError, ValueError) as exc:
        raise PackRejected(f"{path}: the manifest cannot be hashed ({exc})") from None
    if digest != manifest["sha256"]:
        raise PackRejected(f"{path}: the manifest does not match its sha256 (edited or corrupt)")
    if ONNX_FILE not in manifest["files"]:
        raise PackRejected(f"{path}: no sha256 recorded for {ONNX_FILE}")
    allowed = set(manifest["files"]) | {MANIFEST_FILE, SIGNATURE_FILE}
    for entry in os.scandir(folder):
        if entry.is_symlink():
            raise PackRejected(f"{folder}: {entry.name} is a symbolic link; a pack holds only regular files")
        if not entry.is_file(follow_symlinks=False):
            raise PackRejected(f"{folder}: {entry.name} is not a regular file; a pack holds only regular files")
        if entry.name not in allowed:
            raise PackRejected(f"{folder}: {entry.name} is not listed in the manifest (unlisted files are refused)")
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise PackRejected(f"{folder}: {name} is missing")
        if name == ONNX_FILE and contents is not None:
            if file.stat().st_size > MAX_WEIGHTS_BYTES:
                raise PackRejected(f"{file} is larger than {MAX_WEIGHTS_BYTES >> 20} MB")
            data = file.read_bytes()
            ok = sha256_bytes(data) == digest
            contents[name] = data
        else:
            ok = sha256_file(file) == digest
        if not ok:
            raise PackRejected(f"{folder}: {name} does not match the sha256 in its manifest (corrupt or truncated)")
    if WEIGHTS_FILE in manifest["files"]:  # packs before 0.3 carried a second copy of the weights
        check_safetensors(folder / WEIGHTS_FILE)
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
    load_ms: dict = field(default_factory=dict)  # where loading it went: verify, session, warmup

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def label_names(self) -> list[str]:
        return self.manifest["label_names"]

    @property
    def novelty_threshold(self) -> float | None:
        """Answers whose novelty (1 - top probability) exceeds it are "unknown"; None: a pack before 0.4."""
        return (self.manifest.get("novelty") or {}).get("threshold")

    def run(self, taps: dict[str, np.ndarray], present: np.ndarray | None = None,
            options=None) -> tuple[np.ndarray, np.ndarray]:
        """Logits and fused embedding; ``present`` ([B, M] in ``modalities`` order) defaults to all."""
        feeds = {n: taps[n] for n in self.input_names}
        if self.handles_missing:
            batch = len(next(iter(feeds.values())))
            feeds[PRESENT_INPUT] = (np.ones((batch, len(self.modalities)), np.float32) if present is None
                                    else np.ascontiguousarray(present, dtype=np.float32))
        logits, fused = self.session.run(["logits", "fused"], feeds, options)
        return logits, fused


@dataclass
class PackPolicy:
    """What a pack must satisfy beyond integrity; the ``Runtime`` builds one from its arguments.

    trusted_keys: Ed25519 public keys; when given, a pack must be signed by one of them.
    workspace_id: the workspace identity packs must carry (when both sides have one).
    min_version: with trusted keys, packs older than the serving one are refused unless
        ``allow_downgrade``.
    allowed_ops: the graph's operator allow-list (None: no allow-list; for experiments only).
    warmup_seconds: the warm-up inference must finish within this budget or the pack is refused.
    """

    trusted_keys: list = field(default_factory=list)
    workspace_id: str | None = None
    min_version: int | None = None
    allow_downgrade: bool = False
    allowed_ops: frozenset | None = ALLOWED_OPS
    warmup_seconds: float = 10.0


def check_identity(folder: Path, manifest: dict, policy: PackPolicy) -> None:
    if policy.trusted_keys:
        from mmcl_edge.runtime.trust import verify_pack

        verify_pack(folder, manifest, policy.trusted_keys)
    theirs = manifest.get("workspace_id")
    if policy.workspace_id and theirs is not None and theirs != policy.workspace_id:
        raise PackRejected(f"{folder}: the pack belongs to workspace {theirs} (scenario "
                           f"{manifest.get('scenario', '?')}), not to this one ({policy.workspace_id})")
    if policy.trusted_keys and policy.workspace_id and theirs is None:
        raise PackRejected(f"{folder}: the pack carries no workspace id, so it cannot be tied to this workspace")
    if (policy.trusted_keys and not policy.allow_downgrade and policy.min_version is not None
            and manifest["version"] < policy.min_version):
        raise PackRejected(f"{folder}: version {manifest['version']} is older than the serving version "
                           f"{policy.min_version} (a rollback); pass allow_downgrade=True to allow it")


def load_pack(folder: Path, backbones: dict[str, dict], providers: list[str], threads: int = 0,
              policy: PackPolicy | None = None) -> Pack:
    """Validate ``folder`` against the loaded backbones, build its session and warm it up.

    ``backbones`` maps modality -> the backbone index entry (identity and taps) of what is loaded.
    """
    policy = policy or PackPolicy()
    folder = Path(folder)
    t0 = time.perf_counter()
    contents: dict[str, bytes] = {}
    manifest = read_manifest(folder, contents)
    check_identity(folder, manifest, policy)
    mine = {m: e["identity"] for m, e in backbones.items()}
    if manifest["backbones"] != mine:
        raise PackRejected(f"{folder}: trained against backbones {manifest['backbones']}, but this runtime "
                           f"serves {mine}; export the pack from a workspace with the same backbones")
    files = manifest.get("backbone_files")  # packs since 0.4: the backbones' sha256, signed with the pack
    if files is not None and files != {m: e.get("sha256") for m, e in backbones.items()}:
        raise PackRejected(f"{folder}: made for the backbone files {files}, but this runtime loaded "
                           f"{ {m: e.get('sha256') for m, e in backbones.items()} }: the backbones were changed "
                           "or replaced after the pack was made")
    expected = [{"name": f"{m}__{t['name']}", "shape": [None, t["tokens"], t["dim"]]}
                for m, e in backbones.items() for t in e["taps"]]
    declared = [{"name": i.get("name"), "shape": i.get("shape")} if isinstance(i, dict) else i
                for i in manifest["inputs"]]
    if sorted(declared, key=lambda d: str(d.get("name")) if isinstance(d, dict) else "") != sorted(expected, key=lambda d: d["name"]):
        raise PackRejected(f"{folder}: its inputs {str(declared)[:300]} do not match the backbones' taps {expected}")
    data = contents[ONNX_FILE]  # the bytes hashed above are the bytes checked and loaded
    try:
        check_graph_bytes(data, policy.allowed_ops)
    except PackRejected as exc:
        raise PackRejected(f"{folder}: {exc}") from None
    t1 = time.perf_counter()
    try:
        session = prov.session(data, providers, threads, optimization="basic")
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise PackRejected(f"{folder}: {ONNX_FILE} cannot be loaded by onnxruntime ({exc})") from None
    names = [i.name for i in session.get_inputs()]
    handles_missing = PRESENT_INPUT in names
    tap_names = [n for n in names if n != PRESENT_INPUT]
    if sorted(tap_names) != sorted(d["name"] for d in expected):
        raise PackRejected(f"{folder}: the ONNX graph's inputs {names} are not the declared ones")
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if set(outputs) != {"logits", "fused"}:
        raise PackRejected(f"{folder}: the ONNX graph must output 'logits' and 'fused'")
    for name in ("logits", "fused"):
        want = manifest["outputs"][name][1]
        shape = outputs[name]
        if len(shape) != 2 or isinstance(shape[0], int) or shape[1] != want:
            raise PackRejected(f"{folder}: the graph's {name} output has shape {shape}, but the manifest "
                               f"declares [batch, {want}]")
    modalities = manifest.get("modalities") or list(backbones)
    if handles_missing and sorted(modalities) != sorted(backbones):
        raise PackRejected(f"{folder}: its modalities {modalities} are not the backbones' {list(backbones)}")
    pack = Pack(folder, manifest, session, tap_names, list(modalities), handles_missing)
    t2 = time.perf_counter()
    _warm_up(pack, backbones, policy.warmup_seconds)
    pack.load_ms = {"verify": 1e3 * (t1 - t0), "session": 1e3 * (t2 - t1), "warmup": 1e3 * (time.perf_counter() - t2)}
    return pack


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=8)
def _warm_up_taps(shapes: tuple[tuple[str, int, int], ...]) -> dict[str, np.ndarray]:
    """Plausible taps (|N(0, 1)|, batch 2) for ``(name, tokens, dim)``; made once per backbone set
    (0.24 ms of a 9 ms swap on AV-Digits) and read-only, so every warm-up shares them."""
    rng = np.random.default_rng(0)
    taps = {}
    for name, tokens, dim in shapes:
        taps[name] = np.abs(rng.standard_normal((2, tokens, dim))).astype(np.float32)
        taps[name].flags.writeable = False
    return taps


def _warm_up(pack: Pack, backbones: dict[str, dict], budget: float = 10.0) -> None:
    """One inference on plausible taps within ``budget`` seconds: outputs finite, of the declared shapes.

    It runs in a worker thread; past the budget the run is stopped with onnxruntime's
    ``RunOptions.terminate`` (checked between kernels, including each iteration of a loop) and
    the pack is refused. Should a single kernel not return even then, the worker thread is
    abandoned (a daemon thread: onnxruntime offers no way to kill it) and the pack is refused
    all the same: the caller (the watcher) is never wedged.
    """
    import onnxruntime as ort

    taps = _warm_up_taps(tuple((f"{m}__{t['name']}", t["tokens"], t["dim"]) for m, e in backbones.items()
                               for t in e["taps"]))
    present = np.ones((2, len(pack.modalities)), np.float32)
    if pack.handles_missing and len(pack.modalities) > 1:
        present[0, 0] = 0.0  # the first sample lacks a modality: that path must work too
    options = ort.RunOptions()
    result: dict = {}

    def work():
        try:
            result["out"] = pack.run(taps, present, options)
        except Exception as exc:
            result["error"] = exc

    worker = threading.Thread(target=work, name="mmcl-pack-warmup", daemon=True)
    worker.start()
    worker.join(budget)
    if worker.is_alive():
        options.terminate = True
        worker.join(5.0)
        raise PackRejected(f"{pack.folder}: warm-up inference did not finish within {budget:g} s "
                           + ("(stopped)" if not worker.is_alive() else "(abandoned: the kernel did not stop)"))
    if "error" in result:
        raise PackRejected(f"{pack.folder}: warm-up inference failed ({result['error']})") from None
    logits, fused = result["out"]
    n = len(pack.manifest["classes"])
    width = pack.manifest["outputs"]["fused"][1]
    if logits.shape != (2, n):
        raise PackRejected(f"{pack.folder}: warm-up logits have shape {logits.shape}, expected (2, {n})")
    if fused.shape != (2, width):
        raise PackRejected(f"{pack.folder}: warm-up fused output has shape {fused.shape}, expected (2, {width})")
    if not (np.isfinite(logits).all() and np.isfinite(fused).all()):
        raise PackRejected(f"{pack.folder}: warm-up inference gave non-finite outputs")
