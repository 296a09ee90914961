"""Pack export: after every learned task, the MMEncoder + head become a small, self-describing pack.
The graph is written from the weights (``export/pack_graph.py``), not traced.

    WS/packs/v0003/pack.onnx            taps of all modalities -> logits, fused embedding; the one copy
                                        of the weights, stored as float16 and computed in float32
    WS/packs/v0003/manifest.json        what the runtime validates before the pack may serve

(Packs before 0.3 also carried ``weights.safetensors``, a second copy; the runtime still reads them.
The learner's own state, with the ridge head's running sums, lives in ``WS/state``.)
    WS/current                          name of the pack to serve, replaced atomically

A pack is written into a hidden temporary folder, its files fsynced, signed when the workspace
has a signing key (``WS/keys/signing.key`` or ``workspace.json``'s ``signing_key``), renamed into
place, then ``current`` is rewritten atomically (``mmcl_edge.runtime.layout``): a reader sees the
old pack or the new one, never half of one. The manifest carries the workspace id and the sha256
of the task state the pack was built from (how recovery knows the pack of a task is published).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from mmcl_edge.export.onnx_io import sha256_file
from mmcl_edge.export.pack_graph import OPSET, build_pack_model, save_pack_model
from mmcl_edge.runtime import layout
from mmcl_edge.runtime.pack import MANIFEST_FILE, ONNX_FILE, PACK_SCHEMA, pack_digest


def pack_inputs(model) -> list[dict]:
    return [{"name": f"{m}__{t.name}", "modality": m, "tap": t.name, "shape": [None, t.tokens, t.dim]}
            for m, taps in model.encoder.modality_taps.items() for t in taps]


def next_version(packs_dir: Path) -> int:
    return layout.next_version(Path(packs_dir).parent)


def export_pack(model, folder: Path, *, version: int, task: int, classes: list, label_names: list[str],
                setting: str, preprocess: dict, backbones: dict[str, str], extra: dict | None = None,
                weights: str = "float16") -> dict:
    """Write a complete pack into ``folder`` (which must not exist) and return its manifest.
    ``weights``: how the weights are stored ("float16" or "int8", ``pack_graph.build_pack_model``)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    model = model.eval()
    inputs = pack_inputs(model)
    modalities = list(model.encoder.modality_taps)
    graph, sizes = build_pack_model(model, weights)
    save_pack_model(graph, folder / ONNX_FILE)
    files = {ONNX_FILE: sha256_file(folder / ONNX_FILE)}
    manifest = {
        "schema": PACK_SCHEMA,
        "version": version,
        "task": task,
        "setting": setting,
        "classes": [int(c) for c in classes],
        "label_names": [str(n) for n in label_names],
        "inputs": inputs,
        "modalities": modalities,
        "outputs": {"logits": [None, len(classes)], "fused": [None, model.encoder.cfg.width]},
        "preprocess": preprocess,
        "backbones": backbones,
        "opset": OPSET,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
        "weights": {"compute": "float32", **sizes},
        # answers whose novelty (1 - top probability) exceeds the threshold are "unknown"
        **({"novelty": model.novelty.to_dict()} if model.novelty.samples else {}),
        **(extra or {}),
    }
    manifest["sha256"] = pack_digest(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def set_current(root: Path, name: str) -> None:
    """Point ``root/current`` at pack ``name`` atomically (write a temporary file, fsync, rename)."""
    layout.set_current(root, name)


def signing_key_path(ws) -> Path | None:
    """The workspace's signing key: ``workspace.json``'s ``signing_key``, else ``WS/keys/signing.key``."""
    from mmcl_edge.runtime.trust import PRIVATE_KEY_FILE

    configured = ws.meta.get("signing_key")
    if configured:
        return Path(configured)
    default = ws.root / "keys" / PRIVATE_KEY_FILE
    return default if default.is_file() else None


def provenance(record: dict) -> dict:
    """What a pack says of the task it was learned from: origin (folder, bag, inbox or benchmark
    task), data digest, samples per class, classes it added."""
    rec = record.get("report_record") or {}
    origin = dict(rec.get("origin") or record.get("origin") or {})
    return {"origin": origin, "data_sha256": origin.pop("data_sha256", None),
            "samples_per_class": rec.get("samples_per_class"), "classes_added": rec.get("classes_added")}


def publish_pack(ws, task: int, model) -> Path:
    """Export the workspace's backbones if needed, write the pack of ``task`` and make it current."""
    from mmcl_edge.export.backbone_export import ensure_backbones

    src, specs = ws.tap_source(), ws.specs
    index = ensure_backbones(ws.root / "backbones", src.backbones, specs)
    names = ws.class_names(task)
    record = ws.task_record(task) if ws.state_paths(task)[1].is_file() else {}
    packs = ws.root / layout.PACKS_DIR
    version = layout.next_version(ws.root)
    name = layout.pack_name(version)
    tmp = packs / f"{layout.TMP_PREFIX}{name}.partial"
    key = signing_key_path(ws)
    weights = ws.state_paths(task)[0]
    try:
        packs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        manifest = export_pack(model, tmp, version=version, task=task, classes=list(range(len(names))),
                               label_names=names, setting=ws.setting, weights=ws.config.pack_weights,
                               preprocess={m: s.to_dict() for m, s in specs.items()},
                               backbones={m: e["identity"] for m, e in index["modalities"].items()},
                               # the backbone files themselves, under the pack's signature: a follower
                               # that fetched its backbones over a link checks them through this
                               extra={"backbone_files": {m: e["sha256"] for m, e in index["modalities"].items()},
                                      "scenario": "taught" if ws.taught else ws.scenario().name,
                                      "workspace_id": ws.meta.get("workspace_id"),
                                      "state_sha256": sha256_file(weights) if weights.is_file() else None,
                                      "provenance": provenance(record)})
        if key is not None:
            from mmcl_edge.runtime.trust import sign_pack

            sign_pack(tmp, manifest, key)
        for f in tmp.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        layout.fsync_dir(tmp)
        os.replace(tmp, packs / name)
        layout.fsync_dir(packs)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in layout.STORAGE_ERRNOS:
            raise layout.storage_error(exc, packs / name) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    set_current(ws.root, name)
    return packs / name
