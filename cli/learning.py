"""``mmcl-edge learn``, ``eval`` and ``export``: the learner's commands."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from mmcl_edge.cli.common import (DATA_DIR_HELP, DEFAULT_WORKSPACE, SCENARIO_HELP, _pct, err, out, parse_overrides,
                                  print_report, require_extra, user_errors)
from mmcl_edge.errors import WorkspaceError

@user_errors
def learn(
    scenario: str = typer.Option("avdigits-cil", help=SCENARIO_HELP),
    data: Optional[Path] = typer.Option(None, help="Your data in the generic format (folder with train.npz, "
                                                   "test.npz, modalities.json); replaces --scenario."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    setting: str = typer.Option("class-il", help="With --data: class-il or domain-il (tasks = domain ids)."),
    classes_per_task: int = typer.Option(2, help="With --data and class-il: classes per task."),
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w", help="Where state, taps, packs and report live."),
    task: Optional[int] = typer.Option(None, help="Learn only this task (0-based); tasks before it must be learned."),
    force: bool = typer.Option(False, help="Re-learn a task that is already learned (drops later tasks' states)."),
    seed: int = typer.Option(0, help="Seed for the class order, pairing and training."),
    epochs: Optional[int] = typer.Option(None, help="Adapter training epochs per task."),
    set_: list[str] = typer.Option([], "--set", help="Config override key=value, e.g. loss.align=0 or head=linear. "
                                                     "On an existing workspace: applies from the next task on "
                                                     "(recorded in workspace.json)."),
    signing_key: Optional[Path] = typer.Option(None, help="Ed25519 private key (from 'mmcl-edge keys new') to sign "
                                                          "every pack with; remembered in workspace.json."),
    max_forgetting: float = typer.Option(5.0, help="Stop when a task's pack would lose more than this many points "
                                                   "on earlier tasks' held-out data (the forgetting gate of 'teach')."),
):
    """Learn tasks of a stream on the device: taps are extracted once, only adapters + head train."""
    require_extra("learn")
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.workspace import Workspace

    overrides = parse_overrides(set_)
    overrides["train.seed"] = seed
    if epochs is not None:
        overrides["train.epochs"] = epochs
    if data_dir is None and os.environ.get("MMCL_EDGE_DATA"):
        data_dir = Path(os.environ["MMCL_EDGE_DATA"])  # remembered, so later commands need not repeat it
    source = {"scenario": None if data else scenario, "data": str(data.expanduser().resolve()) if data else None,
              "data_dir": str(data_dir.expanduser().resolve()) if data_dir else None,
              "setting": setting if data else None, "classes_per_task": classes_per_task if data else None,
              "seed": seed}
    existed = (workspace.expanduser() / "workspace.json").is_file()
    ws = Workspace.open_or_create(workspace, source, LearnConfig().override(overrides))
    ws.log = lambda note: err.print(f"[yellow]recovered:[/] {note}", highlight=False)
    if existed:
        given = {k: v for k, v in overrides.items() if k != "train.seed"}  # the seed is part of the source
        with ws.lock("learn"):
            changed = ws.apply_overrides(given)
        if changed:
            err.print(f"config: {', '.join(f'{k}={v!r}' for k, v in changed.items())} applies from task "
                      f"{ws.learned_tasks()} on (recorded in workspace.json)", highlight=False)
    if signing_key is not None:
        from mmcl_edge.runtime.trust import load_private_key
        from mmcl_edge.workspace import write_json_atomic

        load_private_key(signing_key)  # refuse an unreadable key now, not after a task is learned
        ws.meta["signing_key"] = str(signing_key.expanduser().resolve())
        with ws.lock("learn"):
            write_json_atomic(ws.root / "workspace.json", ws.meta)
    sc = ws.scenario()
    err.print(f"[bold]{sc.name}[/] ({sc.setting}): {len(sc.tasks)} tasks, modalities "
              f"{', '.join(f'{m} ({s.kind})' for m, s in sc.specs.items())}; workspace {ws.root}")

    def on_task(k, row, rec):
        peak = f", peak {rec['peak_rss_mb']:.0f} MB resident" if rec.get("peak_rss_mb") else ""
        err.print(f"task {k} ({rec['name']}): learned in {rec['train_seconds']:.1f}s "
                  f"(taps {rec['extract_seconds']:.1f}s{peak}); accuracy now "
                  + " ".join(_pct(v).strip() for v in row if v is not None))

    report = ws.learn(task=task, force=force, progress=progress_bar, on_task=on_task, max_forgetting=max_forgetting)
    print_report(report)
    out.print(f"report: {ws.root / 'report.json'}")


@user_errors
def evaluate(workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
             data_dir: Optional[Path] = typer.Option(None, help="FSDD recordings, if they moved.")):
    """Re-evaluate every saved task state on the test sets; rewrites report.json."""
    require_extra("learn")
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.workspace import Workspace

    ws = Workspace.open(workspace)
    ws.log = lambda note: err.print(f"[yellow]recovered:[/] {note}", highlight=False)
    if data_dir:
        ws.meta["source"]["data_dir"] = str(data_dir.expanduser().resolve())
    print_report(ws.evaluate(progress=progress_bar))
    out.print(f"report: {ws.root / 'report.json'}")


@user_errors
def export(workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
           force: bool = typer.Option(False, help="Re-export the backbones even if their identity is unchanged "
                                                  "(files in other bytes: the last pack is published again for "
                                                  "them); with --precision, convert again and accept any accuracy "
                                                  "drop."),
           tensorrt: Optional[bool] = typer.Option(None, "--tensorrt/--no-tensorrt",
                                                   help="Build TensorRT engines (default: when TensorRT and a GPU are present)."),
           fp16: bool = typer.Option(True, help="TensorRT engines in FP16 where the GPU supports it."),
           precision: Optional[str] = typer.Option(None, help="Serve the backbones in fp32, fp16 or int8 (default: "
                                                   "keep the workspace's, fp32 when new). int8/fp16 are checked: "
                                                   "the current pack's test accuracy on the new taps."),
           max_accuracy_drop: float = typer.Option(1.0, help="With --precision: refuse a larger drop, in "
                                                   "accuracy points (unless --force)."),
           threads: int = typer.Option(0, help="With --precision: onnxruntime threads for the checks and "
                                       "timings (0: as the runtime chooses)."),
           modality: list[str] = typer.Option([], "--modality", help="With --precision: convert only this "
                                              "modality's backbone (repeat; the others keep theirs), e.g. "
                                              "INT8 IMU and skeleton with the depth network in FP32.")):
    """Export the workspace's frozen backbones to ONNX (once) and publish the latest pack if missing."""
    require_extra("learn")
    from mmcl_edge.export.backbone_export import ensure_backbones, read_index, verify_index
    from mmcl_edge.export.quantize import change_precision, check_precision
    from mmcl_edge.export.tensorrt_build import TensorRTUnavailable, build_engines
    from mmcl_edge.runtime.tensorrt_backend import tensorrt_available
    from mmcl_edge.workspace import Workspace


    if precision is not None:
        precision = check_precision(precision)
    ws = Workspace.open(workspace)
    ws.log = lambda note: err.print(f"[yellow]recovered:[/] {note}", highlight=False)
    with ws.lock("export"):
        index = read_index(ws.root / "backbones")
        served = {m: e["sha256"] for m, e in index["modalities"].items()}
        if force or not index["modalities"] or verify_index(ws.root / "backbones"):
            index = ensure_backbones(ws.root / "backbones", ws.tap_source().backbones, ws.specs, force=force,
                                     log=err.print)
        problems = verify_index(ws.root / "backbones")
        if problems:
            raise WorkspaceError("; ".join(problems))
        notes = [n for n in ws.recover() if n.startswith("task") and "published" in n]  # the last task's pack, if missing
        rewritten = [m for m, e in index["modalities"].items() if served.get(m, e["sha256"]) != e["sha256"]]
        if rewritten and ws.learned_tasks():
            # the same backbones in other bytes (another writer or exporter version): a pack names the
            # files it was made for, so the last task's pack is published again for these
            from mmcl_edge.export.pack_export import publish_pack

            k = ws.learned_tasks() - 1
            pack = publish_pack(ws, k, ws.load_model(k))
            notes.append(f"published {pack.name}, the pack of task {k} for the new {', '.join(rewritten)} backbone files")
        report = None
        if precision is not None:
            report = change_precision(ws, precision, max_accuracy_drop=max_accuracy_drop, force=force,
                                      threads=threads, log=err.print, modalities=modality or None)
            index = read_index(ws.root / "backbones")
        t = Table(title=f"Backbones in {ws.root / 'backbones'}")
        for c in ("modality", "backbone", "identity", "onnx sha256", "taps"):
            t.add_column(c)
        for m, e in index["modalities"].items():
            t.add_row(m, e["name"], e["identity"], e["sha256"][:16], ", ".join(f"{x['name']} {x['tokens']}x{x['dim']}" for x in e["taps"]))
        out.print(t)
        for note in notes:
            out.print(note)
        if report is not None and not report.changed:
            out.print(f"the backbones already serve {precision} (--force converts again)")
        elif report is not None and precision == "fp32":
            out.print("the backbones serve fp32 again" + (f"; published {report.pack}" if report.pack else ""))
        elif report is not None:
            p = precision
            t = Table(title=f"{p} vs fp32, batch 1, CPU")
            for c in ("modality", "fp32 ms", f"{p} ms", "speed-up", "cos min", "max abs"):
                t.add_column(c, justify="left" if c == "modality" else "right")
            for m, r in report.modalities.items():
                t.add_row(m, f"{r['ms_fp32']:.2f}", f"{r[f'ms_{p}']:.2f}", f"{r['speedup']:.2f}x",
                          f"{r['parity']['cosine_min']:.4f}", f"{r['parity']['max_abs']:.3g}")
            out.print(t)
            a = report.accuracy
            if a:
                out.print(f"accuracy on {a['samples']} test samples ({a['pack']}): fp32 {a['fp32']:.2f}%, "
                          f"{p} {a[p]:.2f}% (drop {a['fp32'] - a[p]:.2f} points; predictions agree on "
                          f"{a['agreement']:.2f}%)")
                if a.get("alone"):
                    out.print(f"with one modality alone in {p}: "
                              + ", ".join(f"{m} {v:.2f}%" for m, v in a["alone"].items()))
            else:
                out.print(f"accuracy not checked: {ws.root} has no pack yet (--force)")
            if report.pack:
                out.print(f"published {report.pack} for the {p} backbones")
    available, why = tensorrt_available()
    if tensorrt or (tensorrt is None and available):
        try:
            build_engines(ws.root / "backbones", fp16=fp16, log=err.print)
            out.print("TensorRT engines built")
        except TensorRTUnavailable as exc:
            err.print(f"[yellow]note:[/] {exc}")
    elif tensorrt is None:
        err.print(f"TensorRT engines skipped: {why} (ONNX backbones run on any onnxruntime provider)")

