"""``mmcl-edge predict`` and ``info``: the torch-free runtime on one machine."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from mmcl_edge.cli.common import DEFAULT_WORKSPACE, out, require_extra, user_errors
from mmcl_edge.errors import WorkspaceError

@user_errors
def predict(workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
            input_: list[str] = typer.Option([], "--input", "-i",
                                             help="A .npz in the generic format (x_<modality> arrays), or "
                                                  "MODALITY=FILE per modality (.wav, .png/.jpg, .npy, .csv); "
                                                  "for a text modality MODALITY=\"the words\" or MODALITY=@file.txt."),
            provider: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (default: best available)."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
            trusted_key: list[Path] = typer.Option([], "--trusted-key",
                                                   help="Ed25519 public key; serve only packs it signed (repeatable)."),
            allow_downgrade: bool = typer.Option(False, help="With --trusted-key: allow a pack older than the serving one."),
            samples: Optional[str] = typer.Option(None, help="With a .npz: which samples, e.g. 0 or 0:10 (default: all)."),
            bag: Optional[Path] = typer.Option(None, help="Replay a robot's recording (rosbag2 folder, .mcap, ROS 1 "
                                                          ".bag) instead of -i: one answer per window."),
            topics: Optional[Path] = typer.Option(None, help="With --bag: TOPICS.json, which topic feeds which modality."),
            window: float = typer.Option(2.0, help="With --bag: window length in seconds."),
            hop: float = typer.Option(0.5, help="With --bag: seconds from one window's start to the next."),
            out_bag: Optional[Path] = typer.Option(None, "--out", help="With --bag: write a new bag (rosbag2, MCAP) "
                                                   "holding the input topics plus /mmcl/prediction.")):
    """Predict with the torch-free runtime from the workspace's current pack.

    A modality may be left out (a sensor that dropped out): the answer says which modalities it used.
    With --bag, a window slides over a robot's recording and each window is answered.
    """
    import numpy as np

    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.errors import InputError
    from mmcl_edge.runtime.inputs import predict_all, read_inputs

    if bool(bag) == bool(input_):
        raise InputError("give -i INPUT or --bag BAG (one of them)")
    if out_bag is not None and bag is None:
        raise InputError("--out writes a bag: it goes with --bag")
    if bag is not None:
        require_extra("ros", "rosbags")
    rt = Runtime(workspace, providers=provider, trusted_keys=list(trusted_key) or None, allow_downgrade=allow_downgrade)
    if bag is not None:
        from mmcl_edge.cli.bag import predict_bag

        return predict_bag(rt, bag, topics, window, hop, out_bag, as_json)
    p = predict_all(rt, read_inputs(input_, rt, samples))  # one answer per sample, whatever the input form
    if as_json:
        def finite(v):  # JSON has no NaN/Infinity: a non-finite number is written as null
            return v if np.isfinite(v) else None

        doc = {"labels": p.labels, "scores": [finite(float(v)) for v in p.scores], "pack_version": p.pack_version,
               "modalities": p.modalities,
               "novelty": None if p.novelty is None else [finite(float(v)) for v in p.novelty],
               "unknown": None if p.unknown is None else [bool(v) for v in p.unknown],
               "timings_ms": {k: finite(float(v)) for k, v in p.timings_ms.items()},
               "authenticated": rt.authenticated}
        print(json.dumps(doc, allow_nan=False))
        return
    t = Table(title=f"Predictions (pack v{p.pack_version:04d})")
    for c in ("sample", "label", "score") + (("novelty", "unknown") if p.novelty is not None else ()):
        t.add_column(c, justify="right")
    for i, (label, score) in enumerate(zip(p.labels, p.scores)):
        extra = () if p.novelty is None else (f"{p.novelty[i]:.2f}", "yes: teach me" if p.unknown[i] else "no")
        t.add_row(str(i), label, f"{score:.3f}", *extra)
    out.print(t)
    out.print("modalities used: " + ", ".join(p.modalities))
    out.print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in p.timings_ms.items()))



@user_errors
def info(workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w")):
    """What a workspace holds: data source, backbones, packs, classes, and the providers here."""
    from mmcl_edge.runtime import providers as prov
    from mmcl_edge.runtime.backbones import INDEX_FILE
    from mmcl_edge.runtime.pack import CURRENT_FILE, MANIFEST_FILE

    from mmcl_edge.runtime.layout import read_json, resolve_root

    root = resolve_root(workspace)
    meta_path = root / "workspace.json"
    if not meta_path.is_file():
        raise WorkspaceError(f"{root} is not a workspace (no workspace.json)")
    meta = read_json(meta_path, "the workspace description")
    src = meta["source"]
    out.print(f"[bold]workspace[/] {root}")
    data = "taught task by task" if src.get("taught") else (src.get("scenario") or src.get("data"))
    out.print(f"data: {data}  head: {meta['config']['head']}")
    index_path = root / "backbones" / INDEX_FILE
    idx = json.loads(index_path.read_text())["modalities"] if index_path.is_file() else {}
    t = Table(title="Backbones")
    for c in ("modality", "backbone", "identity", "onnx", "TensorRT engine"):
        t.add_column(c)
    for m, e in idx.items():
        t.add_row(m, e["name"], e["identity"], e["file"], (e.get("tensorrt") or {}).get("file", "–"))
    out.print(t)
    current = (root / CURRENT_FILE).read_text().strip() if (root / CURRENT_FILE).is_file() else None
    p = Table(title="Packs")
    for c in ("pack", "task", "classes", "created", "size (KB)", "signed", "current"):
        p.add_column(c)
    signed_any = False
    for d in sorted((root / "packs").glob("v[0-9]*")):
        try:
            man = json.loads((d / MANIFEST_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            p.add_row(d.name, "?", "unreadable manifest", "", "", "")
            continue
        size = sum(f.stat().st_size for f in d.iterdir()) // 1024
        signed = (d / "signature.json").is_file()
        signed_any |= signed
        p.add_row(d.name, str(man.get("task")), " ".join(man.get("label_names", [])), man.get("created", ""),
                  str(size), "yes" if signed else "no", "yes" if d.name == current else "")
    out.print(p)
    out.print(f"workspace id: {meta.get('workspace_id', '–')}")
    if signed_any:
        out.print("packs are signed: a runtime given the public key (--trusted-key / trusted_keys=) serves only "
                  "packs signed by it")
    else:
        out.print("packs are not authenticated: they are checked for integrity only (anyone who can write the "
                  "workspace can replace them); sign them with 'mmcl-edge keys new' + learn --signing-key")
    out.print(f"onnxruntime providers here: {', '.join(prov.available())}; chosen: {', '.join(prov.choose())}")

