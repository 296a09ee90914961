"""``mmcl-edge bag inspect``, and the bag side of ``predict --bag`` and ``teach --bag`` (robot
recordings: ROS 2 bags, sqlite3 or MCAP, and ROS 1 .bag files; the ros extra)."""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from mmcl_edge.cli.common import err, out, require_extra, user_errors

bag_app = typer.Typer(no_args_is_help=True,
                      help="Robot recordings (ROS 2 bags: sqlite3 or MCAP; ROS 1 .bag): see what a bag holds. "
                           "'teach --bag' learns from one, 'predict --bag' replays one through the runtime.")


@bag_app.command("inspect")
@user_errors
def bag_inspect(bag: Path = typer.Argument(..., help="A rosbag2 folder, an .mcap file or a ROS 1 .bag."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Topics, message types, counts, rates and time range: what TOPICS.json needs."""
    require_extra("ros", "rosbags")
    from mmcl_edge.ros import Bag

    with Bag(bag) as b:
        info = b.inspect()
    if as_json:
        print(json.dumps(info))
        return
    t = Table(title=f"{escape(info['bag'])} ({info['storage']}): {info['duration']:.3f} s, {info['messages']} messages")
    for c in ("topic", "type", "count", "rate (Hz)", "first (s)", "last (s)"):
        t.add_column(c, justify="left" if c in ("topic", "type") else "right",
                     overflow="fold" if c in ("topic", "type") else "ellipsis")  # names whole: they go into TOPICS.json
    for r in info["topics"]:
        t.add_row(escape(r["topic"]), escape(str(r["type"])), str(r["count"]),
                  "–" if r["rate_hz"] is None else f"{r['rate_hz']:.2f}",
                  "–" if r["start"] is None else f"{r['start']:.3f}", "–" if r["end"] is None else f"{r['end']:.3f}")
    out.print(t)
    out.print("times: seconds from the bag's first message (what LABELS.csv and predict --bag count from)")


def predict_bag(rt, bag: Path, topics: Path | None, window: float, hop: float, out_bag: Path | None,
                as_json: bool) -> None:
    """``predict --bag``: one answer per window, printed as they come (``--json``: one object per line)."""
    from mmcl_edge.errors import DataFormatError
    from mmcl_edge.ros import replay

    if topics is None:
        raise DataFormatError("--bag needs --topics TOPICS.json (which topic feeds which modality)")
    answers = replay(rt, bag, topics, window, hop, out=out_bag)
    if as_json:
        for a in answers:
            print(json.dumps(a, allow_nan=False), flush=True)
    else:
        t = Table(title=f"Predictions over {escape(str(bag))} (window {window:g} s, hop {hop:g} s)")
        extra = []
        for a in answers:
            if not t.rows:
                extra = [k for k in ("unknown", "novelty") if k in a]
                for c in ("start", "end", "label", "score", *extra, "modalities", "pack"):
                    t.add_column(c, justify="right")
            t.add_row(f"{a['start']:.2f}", f"{a['end']:.2f}", escape(a["label"]),
                      "–" if a["score"] is None else f"{a['score']:.3f}", *[str(a[k]) for k in extra],
                      ", ".join(a["modalities"]), f"v{a['pack_version']:04d}")
        out.print(t if t.rows else "no window had a message on any topic")
    if out_bag is not None:
        err.print(f"wrote {out_bag} (the bag's topics plus /mmcl/prediction)")


@contextmanager
def bag_task_folder(workspace: Path, bag: Path, topics: Path | None, labels: Path | None):
    """``teach --bag``: the labelled windows of ``bag`` as a task folder in a temporary directory beside
    the workspace (never inside it), removed afterwards; yields (folder, origin)."""
    require_extra("ros", "rosbags")
    from mmcl_edge.errors import DataFormatError
    from mmcl_edge.ros import bag_origin, bag_to_task_folder

    if topics is None or labels is None:
        raise DataFormatError("--bag needs --topics TOPICS.json and --labels LABELS.csv")
    parent = workspace.expanduser().resolve().parent
    if not parent.is_dir():
        raise DataFormatError(f"the folder {parent} for the workspace does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{workspace.name}.bag-", dir=parent))
    try:
        folder = bag_to_task_folder(bag, topics, labels, tmp / "task")
        yield folder, {**bag_origin(bag, topics, labels), "folder": None}   # the folder was temporary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
