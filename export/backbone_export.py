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
import time
from pathlib import Path

import torch

from mmcl_edge.backbones import TappedBackbone
from mmcl_edge.export.onnx_io import OPSET, export_onnx, sha256_file
from mmcl_edge.export.quantize import base_identity, entry_precision, with_precision
from mmcl_edge.preprocess import PreprocessSpec

INPUT_NAME = "x"
INDEX_FILE = "backbones.json"


def export_backbone(backbone: TappedBackbone, path: Path) -> str:
    """Backbone -> ONNX with input ``x [batch, *input_shape]`` and one output per tap."""
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
                     force: bool = False, log=None) -> dict:
    """Export the backbones not yet exported (or whose identity changed); returns the index.

    The FP32 identity decides; a modality served in a lower precision keeps it while its weights
    are unchanged (also when ``force`` re-exports the FP32 file) and its file is there.
    """
    folder = Path(folder)
    index = read_index(folder)
    changed = False
    for m, bb in backbones.items():
        have = index["modalities"].get(m)
        file = f"{m}.onnx"
        same = have is not None and base_identity(have) == bb.identity() and have["preprocess"] == specs[m].to_dict()
        if not force and same and (folder / file).is_file() and (folder / have["file"]).is_file():
            continue
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
        changed = True
    if changed:
        index["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_index(folder, index)
    return index


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
