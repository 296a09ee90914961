"""Issue 18's targets, measured: bag reading throughput, teach-from-bag vs npz accuracy, replay time.

    python benchmarks/bags.py --classes 9 --out benchmarks/results/bags.json

Writes a UTD-MHAD recording (cross-subject split, the first --classes actions, every sample: IMU as
Imu at 50 Hz, skeleton as JointState at 30 Hz, depth as 16UC1 Image at 15 Hz, jittered stamps) as
an MCAP bag with tests/bagkit.py, then
1. reads it into a task folder (bag_to_task_folder) and reports seconds of recording per second;
2. teaches that folder and the same samples' npz folder (one task each, same seed and config) and
   compares held-out accuracy;
3. replays a 60 s stretch through the runtime (window 2.0 s, hop 0.5 s, --out bag) and times it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bagkit import UTD_TOPICS, utd_recording, utd_samples, write_bag, write_labels  # noqa: E402


def npz_folder(samples, folder: Path) -> Path:
    """The same samples in the generic format, as the prepared data set holds them."""
    names = sorted({label for _, label, split in samples if split == "train"})
    folder.mkdir()
    for split in ("train", "test"):
        pick = [(x, label) for x, label, s in samples if s == split]
        np.savez(folder / f"{split}.npz", y=np.array([names.index(label) for _, label in pick]),
                 **{f"x_{m}": np.stack([x[m] for x, _ in pick]) for m in ("imu", "skeleton", "depth")})
    spec = {"imu": {"kind": "timeseries"}, "skeleton": {"kind": "timeseries"}, "depth": {"kind": "video", "frames": 16}}
    (folder / "modalities.json").write_text(json.dumps({**spec, "class_names": names}))
    return folder


def teach(folder: Path, ws: Path, epochs: int) -> dict:
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.data.generic import read_task_folder
    from mmcl_edge.workspace import Workspace

    specs, task = read_task_folder(folder)
    w = Workspace.create_taught(ws, specs, task.train, LearnConfig().override({"train.epochs": epochs}))
    t = time.perf_counter()
    result = w.learn_task(task)
    return {"accuracy": result["row"][0], "seconds": round(time.perf_counter() - t, 1),
            "train": int(len(task.train.y)), "test": int(len(task.heldout.y))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--utd", type=Path, default=Path(os.environ.get("MMCL_EDGE_UTD_MHAD", REPO / ".." / "shared" / "data" / "utd-mhad")))
    ap.add_argument("--classes", type=int, default=9)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--skip-teach", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true", help="Keep the bags, folders and workspaces (printed).")
    args = ap.parse_args()

    from mmcl_edge.ros import Bag, bag_to_task_folder, replay

    work = Path(tempfile.mkdtemp(prefix="bags-bench-"))
    res: dict = {"classes": args.classes, "cpu_count": os.cpu_count(),
                 "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MMCL_EDGE_LEARN_THREADS")}}
    samples = utd_samples(args.utd, list(range(args.classes)))
    t = time.perf_counter()
    streams, rows = utd_recording(samples, skeleton_as="joint_state", seed=0)
    bag = write_bag(work / "utd", streams, "mcap")
    write_labels(work / "labels.csv", rows)
    (work / "topics.json").write_text(json.dumps(UTD_TOPICS))
    res["write_seconds"] = round(time.perf_counter() - t, 1)
    with Bag(bag) as b:
        info = b.inspect()
    res["bag"] = {"duration_s": info["duration"], "messages": info["messages"],
                  "mb": round(sum(f.stat().st_size for f in bag.rglob("*") if f.is_file()) / 2**20, 1),
                  "rates_hz": {r["topic"]: r["rate_hz"] for r in info["topics"]}}

    t = time.perf_counter()
    folder = bag_to_task_folder(bag, work / "topics.json", work / "labels.csv", work / "from_bag")
    read_s = time.perf_counter() - t
    res["read"] = {"seconds": round(read_s, 2), "x_real_time": round(info["duration"] / read_s, 1)}
    print(json.dumps(res), flush=True)

    if not args.skip_teach:
        res["teach_bag"] = teach(folder, work / "ws_bag", args.epochs)
        print(json.dumps(res["teach_bag"]), flush=True)
        res["teach_npz"] = teach(npz_folder(samples, work / "from_npz"), work / "ws_npz", args.epochs)
        print(json.dumps(res["teach_npz"]), flush=True)
        res["accuracy_gap_points"] = round(100 * (res["teach_bag"]["accuracy"] - res["teach_npz"]["accuracy"]), 2)

        from mmcl_edge.runtime import Runtime

        # a 60 s stretch: the first actions of the recording, cut into its own bag
        first = [s for s in samples if s[2] == "test"][:15]
        streams, _ = utd_recording(first, seed=2)
        short = write_bag(work / "minute", streams, "mcap")
        with Bag(short) as b:
            minute = b.duration
        rt = Runtime(work / "ws_bag", providers="cpu")
        t = time.perf_counter()
        answers = list(replay(rt, short, work / "topics.json", window=2.0, hop=0.5, out=work / "minute_out"))
        res["replay"] = {"recording_s": round(minute, 1), "windows": len(answers),
                         "seconds": round(time.perf_counter() - t, 2)}
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
