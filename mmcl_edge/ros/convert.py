"""A labelled bag -> one task folder in the generic format (what ``teach`` learns from).

LABELS.csv rows ``start,end,label[,split]`` (seconds from the bag's first message; split ``train``
or ``test``, train when absent) each become one multi-modal sample, cut by SensorWindow. Arrays
must have one shape per modality, so every window of a modality is resampled to the same length:
timeseries to ``steps`` (TOPICS.json) or round(longest labelled window x the topic's mean rate)
steps, video to ``frames`` frames, image / vector to one message. A modality with no message in a
row's window is marked absent for that sample (``present_<modality>`` false, zeros in ``x_``).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcl_edge.data.dataset import MultiModalDataset
from mmcl_edge.data.generic import write_task_folder
from mmcl_edge.errors import DataFormatError
from mmcl_edge.preprocess import PreprocessSpec
from mmcl_edge.ros.bag import Bag, bag_sha256
from mmcl_edge.ros.topics import load_topics
from mmcl_edge.ros.window import SensorWindow

SPLITS = ("train", "test")
CLOCK_HINT = ("; if a sensor stamps its headers with its own clock, not the recording's, give it "
              "\"time\": \"receive\" in TOPICS.json")


@dataclass(frozen=True)
class LabelRow:
    line: int          # line in LABELS.csv (1 = the header)
    start: float
    end: float
    label: str
    split: str = "train"

    def where(self, path) -> str:
        return f"{path} line {self.line} ({self.start:g}-{self.end:g} s, {self.label!r})"


def read_labels(path) -> list[LabelRow]:
    """LABELS.csv -> rows; a malformed row is a DataFormatError naming its line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if header[:3] != ["start", "end", "label"] or header[3:] not in ([], ["split"]):
        raise DataFormatError(f"{path} must start with the header start,end,label (and optionally ,split), "
                              f"not {','.join(header)!r}")
    rows = []
    for line, cells in enumerate(reader, start=2):
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise DataFormatError(f"{path} line {line} has {len(cells)} cells; the header has {len(header)}")
        try:
            start, end = float(cells[0]), float(cells[1])
        except ValueError:
            raise DataFormatError(f"{path} line {line}: start and end must be seconds, not {cells[0]!r}, {cells[1]!r}") from None
        label = cells[2].strip()
        split = cells[3].strip().lower() if len(cells) > 3 and cells[3].strip() else "train"
        if not (math.isfinite(start) and math.isfinite(end) and end > start):
            raise DataFormatError(f"{path} line {line}: end ({cells[1]}) must be after start ({cells[0]})")
        if not label:
            raise DataFormatError(f"{path} line {line} has no label")
        if split not in SPLITS:
            raise DataFormatError(f"{path} line {line}: split must be train or test, not {cells[3]!r}")
        rows.append(LabelRow(line, start, end, label, split))
    if not rows:
        raise DataFormatError(f"{path} has no label rows")
    return rows


def bag_origin(bag, topics_json, labels_csv) -> dict:
    """Where a task taught from a bag came from: paths and the sha256 of each file of the bag."""
    return {"bag": str(Path(bag).expanduser().resolve()), "bag_sha256": bag_sha256(Path(bag).expanduser()),
            "topics": str(Path(topics_json).resolve()) if isinstance(topics_json, (str, Path)) else None,
            "labels": str(Path(labels_csv).resolve())}


def bag_to_task_folder(bag, topics_json, labels_csv, out_dir) -> Path:
    """Cut the labelled windows of ``bag`` into a generic-format folder at ``out_dir`` (new or empty):
    ``modalities.json`` (with ``class_names``), ``train.npz``, ``test.npz`` when rows say split=test,
    and ``origin.json`` (bag path and sha256 of its files, measured rates, steps). Nothing is
    written until every row has been cut, so a bad row leaves ``out_dir`` as it was."""
    sources = load_topics(topics_json)
    rows = read_labels(labels_csv)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataFormatError(f"{out_dir} must be a new or empty folder for the task's data")
    with Bag(bag) as b:
        b.check_topics([s.topic for s in sources.values()])
        for r in rows:
            if r.start < 0 or r.end > b.duration + 1e-6:
                raise DataFormatError(f"{r.where(labels_csv)} is outside the recording (0-{b.duration:.3f} s)")
        steps = b.series_steps(sources, max(r.end - r.start for r in rows))
        sw = SensorWindow(sources, steps=steps, origin_ns=b.start_ns)
        for r in rows:
            sw.schedule(r.start, r.end, key=r)
        cut: dict[LabelRow, dict] = {}
        for topic, ns, msg in b.messages(sorted({s.topic for s in sources.values()})):
            for w in sw.push(topic, ns, msg):
                cut[w.key] = w.sample
        for w in sw.flush():
            cut[w.key] = w.sample
        origin = bag_origin(bag, topics_json, labels_csv)
        origin.update({"storage": b.storage, "duration": b.duration})
    for r in rows:
        if not cut[r]:
            raise DataFormatError(f"{r.where(labels_csv)}: no topic has a message in this window "
                                  f"({', '.join(s.topic for s in sources.values())}){CLOCK_HINT}")
    class_names = sorted({r.label for r in rows if r.split == "train"})
    if not class_names:
        raise DataFormatError(f"{labels_csv} has no train rows: a task needs some")
    unseen = [r for r in rows if r.label not in class_names]
    if unseen:
        raise DataFormatError(f"{unseen[0].where(labels_csv)}: label {unseen[0].label!r} has no train row")
    shapes, dtypes = {}, {}
    for m in sources:
        present = [cut[r][m] for r in rows if m in cut[r]]
        if not present:
            raise DataFormatError(f"topic {sources[m].topic} ({m}) has no message in any labelled window{CLOCK_HINT}")
        shapes[m] = {np.shape(v) for v in present}
        if len(shapes[m]) > 1:
            raise DataFormatError(f"topic {sources[m].topic} ({m}) gives windows of different shapes "
                                  f"{sorted(shapes[m])}: its images change size")
        shapes[m] = shapes[m].pop()
        dtypes[m] = np.result_type(*{np.asarray(v).dtype for v in present})
    splits = {}
    for split in SPLITS:
        picked = [r for r in rows if r.split == split]
        if picked:                    # absent: a zero placeholder of the modality's shape, marked absent
            splits[split] = MultiModalDataset(
                {m: [np.asarray(cut[r].get(m, np.zeros(shapes[m], dtypes[m])), dtypes[m]) for r in picked]
                 for m in sources},
                np.array([class_names.index(r.label) for r in picked], np.int64), None,
                {m: np.array([m in cut[r] for r in picked]) for m in sources})
    specs = {m: PreprocessSpec(kind=s.kind, **s.preprocess) for m, s in sources.items()}
    origin.update({"rows": {s: len(d) for s, d in splits.items()},
                   "steps": steps, "rates_hz": {m: r and round(r, 3) for m, r in sw.rates().items()},
                   "windows": "timeseries: steps per window (TOPICS.json \"steps\", else round(longest window x "
                              "mean rate)); video: frames; image/vector: the message nearest the middle"})
    write_task_folder(out_dir, specs, splits["train"], class_names, splits.get("test"))
    (out_dir / "origin.json").write_text(json.dumps(origin, indent=1))
    return out_dir
