"""The bag side of ``mmcl-edge bag inspect`` and ``predict --bag`` (robot recordings; the ros extra).

The typer commands live in cli/main.py beside the helpers they share (user_errors, consoles);
these functions do the work and print through the consoles they are given.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def print_inspect(bag: Path, as_json: bool, out: Console) -> None:
    """Topics, message types, counts, rates and time range: what TOPICS.json needs."""
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
                as_json: bool, out: Console, err: Console) -> None:
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
