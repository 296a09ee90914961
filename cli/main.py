"""``mmcl-edge``: learn, evaluate, export, predict, inspect and benchmark."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Multi-modal continual learning on edge devices: frozen backbones, cross-modality "
                       "mixture-of-experts adapters learned task by task, hot-swapped into a torch-free runtime.")
data_app = typer.Typer(no_args_is_help=True, help="Get data sets (only ever downloads when you ask).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: continual-learning accuracy and latency.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
out = Console()
err = Console(stderr=True)

DEFAULT_WORKSPACE = Path("mmcl-workspace")


def user_errors(fn):
    """Turn the errors a user can cause into one plain message and exit code 2 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mmcl_edge.data import DataFormatError
        from mmcl_edge.workspace import WorkspaceError
        try:
            return fn(*args, **kwargs)
        except (DataFormatError, WorkspaceError, KeyError, FileNotFoundError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            err.print(f"[bold red]error:[/] {msg}")
            raise typer.Exit(2)
        except Exception as exc:
            from mmcl_edge.runtime.errors import RuntimeUserError
            if isinstance(exc, RuntimeUserError):
                err.print(f"[bold red]error:[/] {exc}")
                raise typer.Exit(2)
            raise
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
            raise KeyError(f"--set expects key=value (e.g. loss.align=0), got {item!r}")
        k, v = item.split("=", 1)
        try:
            overrides[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k.strip()] = v
    return overrides


@app.command()
@user_errors
def learn(
    scenario: str = typer.Option("avdigits-cil", help="Built-in task stream: avdigits-cil or avdigits-dil."),
    data: Optional[Path] = typer.Option(None, help="Your data in the generic format (folder with train.npz, "
                                                   "test.npz, modalities.json); replaces --scenario."),
    data_dir: Optional[Path] = typer.Option(None, help="FSDD recordings for AV-Digits (else $MMCL_EDGE_DATA)."),
    setting: str = typer.Option("class-il", help="With --data: class-il or domain-il (tasks = domain ids)."),
    classes_per_task: int = typer.Option(2, help="With --data and class-il: classes per task."),
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w", help="Where state, taps, packs and report live."),
    task: Optional[int] = typer.Option(None, help="Learn only this task (0-based); tasks before it must be learned."),
    force: bool = typer.Option(False, help="Re-learn a task that is already learned (drops later tasks' states)."),
    seed: int = typer.Option(0, help="Seed for the class order, pairing and training."),
    epochs: Optional[int] = typer.Option(None, help="Adapter training epochs per task."),
    set_: list[str] = typer.Option([], "--set", help="Config override key=value, e.g. loss.align=0 or head=linear."),
):
    """Learn tasks of a stream on the device: taps are extracted once, only adapters + head train."""
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.workspace import Workspace

    overrides = parse_overrides(set_)
    overrides["train.seed"] = seed
    if epochs is not None:
        overrides["train.epochs"] = epochs
    source = {"scenario": None if data else scenario, "data": str(data.expanduser().resolve()) if data else None,
              "data_dir": str(data_dir.expanduser().resolve()) if data_dir else None,
              "setting": setting if data else None, "classes_per_task": classes_per_task if data else None,
              "seed": seed}
    ws = Workspace.open_or_create(workspace, source, LearnConfig().override(overrides))
    sc = ws.scenario()
    err.print(f"[bold]{sc.name}[/] ({sc.setting}): {len(sc.tasks)} tasks, modalities "
              f"{', '.join(f'{m} ({s.kind})' for m, s in sc.specs.items())}; workspace {ws.root}")

    def on_task(k, row, rec):
        err.print(f"task {k} ({rec['name']}): learned in {rec['train_seconds']:.1f}s "
                  f"(taps {rec['extract_seconds']:.1f}s); accuracy now "
                  + " ".join(_pct(v).strip() for v in row if v is not None))

    report = ws.learn(task=task, force=force, progress=progress_bar, on_task=on_task)
    print_report(report)
    out.print(f"report: {ws.root / 'report.json'}")


@app.command("eval")
@user_errors
def evaluate(workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w"),
             data_dir: Optional[Path] = typer.Option(None, help="FSDD recordings, if they moved.")):
    """Re-evaluate every saved task state on the test sets; rewrites report.json."""
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.workspace import Workspace

    ws = Workspace.open(workspace)
    if data_dir:
        ws.meta["source"]["data_dir"] = str(data_dir.expanduser().resolve())
    print_report(ws.evaluate(progress=progress_bar))
    out.print(f"report: {ws.root / 'report.json'}")


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
