"""Export each modality's frozen backbone (with its taps as outputs) to ONNX, once per workspace.

``WS/backbones/backbones.json`` records, per modality, the ONNX file and its sha256, the
backbone's identity (hash of architecture + weights, the key packs are checked against), its taps
and the preprocessing the runtime must apply before it. A modality may serve a lower-precision
file instead (``export/quantize.py``): the entry then names that file, its ``precision`` and an
identity with the precision as suffix; ``base_identity`` and ``fp32_file`` keep the FP32 export.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmcl_edge.backbones import TappedBackbone
from mmcl_edge.export.onnx_io import OPSET, export_onnx, save_onnx, sha256_file
from mmcl_edge.export.quantize import base_identity, entry_precision, with_precision
from mmcl_edge.export.written_backbones import written_model
from mmcl_edge.preprocess import PreprocessSpec

INPUT_NAME = "x"
INDEX_FILE = "backbones.json"


def export_backbone(backbone: TappedBackbone, path: Path) -> str:
    """Backbone -> ONNX with input ``x [batch, *input_shape]`` and one output per tap: written from
    its weights where ``export/written_backbones.py`` can, else through PyTorch's exporter."""
    written = written_model(backbone, INPUT_NAME)
    if written is not None:
        model, initializers = written
        return save_onnx(model, path, initializers)
    example = (torch.zeros(2, *backbone.input_shape),)
    return export_onnx(backbone, example, path, [INPUT_NAME], [t.name for t in backbone.taps],
                       free_axes=backbone.free_axes)


def backbone_entry(modality: str, backbone: TappedBackbone, spec: PreprocessSpec, file: str, sha: str) -> dict:
    return {"modality": modality, "name": backbone.name, "identity": backbone.identity(),
            "base_identity": backbone.identity(), "precision": "fp32", "file": file,
            "sha256": sha, "input": INPUT_NAME, "input_shape": list(backbone.input_shape), "opset": OPSET,
            "taps": [vars(t) for t in backbone.taps], "preprocess": spec.to_dict()}


def _export_tokenizer(folder: Path, modality: str, spec: PreprocessSpec) -> dict:
    """A text modality's tokenizer travels with its backbone: the runtime tokenises with this copy."""
    if spec.kind != "text" or spec.encoding != "tokens":
        return {}
    from mmcl_edge.text import packaged_tokenizer

    file = f"{modality}.tokenizer.json"
    shutil.copyfile(spec.options.get("tokenizer_file") or packaged_tokenizer(), folder / file)
    return {"tokenizer": {"file": file, "sha256": sha256_file(folder / file)}}


def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else {"modalities": {}}


def ensure_backbones(folder: Path, backbones: dict[str, TappedBackbone], specs: dict[str, PreprocessSpec],
                     force: bool = False, log=None, in_process: bool = False) -> dict:
    """Export the backbones not yet exported (or whose identity changed); returns the index.

    The FP32 identity decides; a modality served in a lower precision keeps it while its weights
    are unchanged (also when ``force`` re-exports the FP32 file) and its file is there.

    The export runs in a short-lived child process (``in_process``: here): the dynamo exporter's
    modules (``torch._dynamo``, ``onnxscript``, sympy: about 190 MB on AV-Digits) never leave the
    process that imports them, and a learner would carry them through every later task. The
    child builds the same backbones from their specs and input shapes and checks their
    identities; where it cannot (a backbone it cannot rebuild), the export runs here.
    """
    folder = Path(folder)
    index = read_index(folder)
    todo = {m: bb for m, bb in backbones.items() if force or not _exported(index, folder, m, bb, specs[m])}
    if not todo:
        return index
    if not in_process and _export_in_child(folder, todo, specs, force, log):
        return read_index(folder)
    for m, bb in todo.items():
        have = index["modalities"].get(m)
        file = f"{m}.onnx"
        same = have is not None and base_identity(have) == bb.identity() and have["preprocess"] == specs[m].to_dict()
        if log:
            log(f"exporting the {m} backbone ({bb.name}) to ONNX ...")
        start = time.perf_counter()
        sha = export_backbone(bb, folder / file)
        entry = backbone_entry(m, bb, specs[m], file, sha)
        entry.update(_export_tokenizer(folder, m, specs[m]))
        entry["export_seconds"] = round(time.perf_counter() - start, 2)
        precision = entry_precision(have) if have else "fp32"
        if (precision != "fp32" and same and (folder / have["file"]).is_file()
                and sha256_file(folder / have["file"]) == have["sha256"]):
            entry = with_precision(entry, precision, have["file"], have["sha256"], have.get("quantization"))
        elif precision != "fp32" and log:
            log(f"the {m} backbone changed: its {precision.upper()} file no longer fits and FP32 serves; "
                f"'mmcl-edge export --precision {precision}' converts it again")
        index["modalities"][m] = entry
    index["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_index(folder, index)
    return index


def _exported(index: dict, folder: Path, modality: str, bb: TappedBackbone, spec: PreprocessSpec) -> bool:
    have = index["modalities"].get(modality)
    return (have is not None and base_identity(have) == bb.identity() and have["preprocess"] == spec.to_dict()
            and (folder / f"{modality}.onnx").is_file() and (folder / have["file"]).is_file())


def _export_in_child(folder: Path, backbones: dict[str, TappedBackbone], specs: dict[str, PreprocessSpec],
                     force: bool, log) -> bool:
    """``ensure_backbones`` for ``backbones`` in a child process; False when it did not export them."""
    job = {"folder": str(folder), "force": force,
           "modalities": {m: {"spec": specs[m].to_dict(), "input_shape": list(bb.input_shape),
                              "identity": bb.identity()} for m, bb in backbones.items()}}
    try:
        child = subprocess.Popen([sys.executable, "-m", "mmcl_edge.export.backbone_export"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        child.stdin.write(json.dumps(job))
        child.stdin.close()
        for line in child.stdout:  # the child's log lines, as they come
            if log:
                log(line.rstrip("\n"))
        return child.wait() == 0
    except OSError:
        return False


def _child_main() -> int:
    """The child of ``_export_in_child``: rebuild the backbones, check them, export them."""
    from mmcl_edge.taps import backbone_for

    job = json.load(sys.stdin)
    specs, backbones = {}, {}
    for m, e in job["modalities"].items():
        specs[m] = PreprocessSpec.from_dict(e["spec"])
        backbones[m] = backbone_for(specs[m], None, shape=tuple(e["input_shape"]))
        if backbones[m].identity() != e["identity"]:
            return 3  # not the learner's backbone: the parent exports its own
    ensure_backbones(Path(job["folder"]), backbones, specs, force=job["force"],
                     log=lambda note: print(note, flush=True), in_process=True)
    return 0


def write_index(folder: Path, index: dict) -> None:
    """Replace ``backbones.json`` atomically: readers see the old index or the new one."""
    tmp = Path(folder) / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    tmp.replace(Path(folder) / INDEX_FILE)


def verify_index(folder: Path) -> list[str]:
    """Problems with the exported backbones (missing files, changed hashes); empty when sound."""
    index = read_index(folder)
    problems = []
    for m, e in index["modalities"].items():
        path = Path(folder) / e["file"]
        if not path.is_file():
            problems.append(f"{m}: {path} is missing")
        elif sha256_file(path) != e["sha256"]:
            problems.append(f"{m}: {path} does not match its recorded sha256")
    return problems


if __name__ == "__main__":
    sys.exit(_child_main())
