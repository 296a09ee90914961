"""Export each modality's frozen backbone (with its taps as outputs) to ONNX, once per workspace.

``WS/backbones/backbones.json`` records, per modality, the ONNX file and its sha256, the
backbone's identity (hash of architecture + weights, the key packs are checked against), its taps
and the preprocessing the runtime must apply before it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mmcl_edge.backbones import TappedBackbone
from mmcl_edge.export.onnx_io import OPSET, export_onnx, sha256_file
from mmcl_edge.preprocess import PreprocessSpec

INPUT_NAME = "x"
INDEX_FILE = "backbones.json"


def export_backbone(backbone: TappedBackbone, path: Path) -> str:
    """Backbone -> ONNX with input ``x [batch, *input_shape]`` and one output per tap."""
    example = (torch.zeros(2, *backbone.input_shape),)
    return export_onnx(backbone, example, path, [INPUT_NAME], [t.name for t in backbone.taps])


def backbone_entry(modality: str, backbone: TappedBackbone, spec: PreprocessSpec, file: str, sha: str) -> dict:
    return {"modality": modality, "name": backbone.name, "identity": backbone.identity(), "file": file,
            "sha256": sha, "input": INPUT_NAME, "input_shape": list(backbone.input_shape), "opset": OPSET,
            "taps": [vars(t) for t in backbone.taps], "preprocess": spec.to_dict()}


def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else {"modalities": {}}


def ensure_backbones(folder: Path, backbones: dict[str, TappedBackbone], specs: dict[str, PreprocessSpec],
                     force: bool = False, log=None) -> dict:
    """Export the backbones not yet exported (or whose identity changed); returns the index."""
    folder = Path(folder)
    index = read_index(folder)
    changed = False
    for m, bb in backbones.items():
        have = index["modalities"].get(m)
        file = f"{m}.onnx"
        if (not force and have and have["identity"] == bb.identity() and (folder / file).is_file()
                and have["preprocess"] == specs[m].to_dict()):
            continue
        if log:
            log(f"exporting the {m} backbone ({bb.name}) to ONNX ...")
        start = time.perf_counter()
        sha = export_backbone(bb, folder / file)
        index["modalities"][m] = backbone_entry(m, bb, specs[m], file, sha)
        index["modalities"][m]["export_seconds"] = round(time.perf_counter() - start, 2)
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
