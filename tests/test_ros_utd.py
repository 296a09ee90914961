"""UTD-MHAD through a robot's recording (issue 18): a real bag (IMU as Imu at 50 Hz, skeleton at
30 Hz, depth as 16UC1 Image at 15 Hz, jittered stamps) -> task folder -> taught -> replayed through
the torch-free runtime -> the output bag read back. Few classes and epochs: CI time."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rosbags")

from bagkit import UTD_TOPICS, utd_recording, utd_samples, write_bag, write_labels  # noqa: E402

from mmcl_edge.ros import PREDICTION_TOPIC, Bag, bag_to_task_folder, replay  # noqa: E402

REPO_ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
CLASSES = [0, 2, 11]                     # swipe_left, wave, bowling


@pytest.fixture(scope="module")
def utd_dir() -> Path:
    env = os.environ.get("MMCL_EDGE_UTD_MHAD")
    folder = Path(env).expanduser() if env else (REPO_ROOT / ".." / "shared" / "data" / "utd-mhad").resolve()
    if not (folder / "utd-mhad-cross-subject" / "train.npz").is_file():
        pytest.skip("UTD-MHAD not found: set MMCL_EDGE_UTD_MHAD or put it in ../shared/data/utd-mhad")
    return folder


@pytest.fixture(scope="module")
def recording(utd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("utd-bag")
    samples = utd_samples(utd_dir, CLASSES, {"train": 6, "test": 3})
    streams, rows = utd_recording(samples, skeleton_as="float32_multiarray", seed=1)
    bag = write_bag(root / "session", streams, "mcap")
    labels = write_labels(root / "labels.csv", rows)
    (root / "topics.json").write_text(json.dumps(UTD_TOPICS))
    return root, bag, labels, samples


@pytest.fixture(scope="module")
def taught(recording, single_thread_module):
    """``mmcl-edge teach --bag``: the recording's labelled windows as the workspace's first task."""
    from mmcl_edge.workspace import Workspace

    root, bag, labels, _ = recording
    r = cli("teach", "-w", root / "ws", "--bag", bag, "--topics", root / "topics.json", "--labels", labels,
            "--epochs", 3, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert not list(root.glob(".ws.bag-*"))                      # the temporary task folder is gone
    folder = bag_to_task_folder(bag, root / "topics.json", labels, root / "task")   # what teach learned from
    return Workspace.open(root / "ws"), result, folder


@pytest.fixture(scope="module")
def single_thread_module():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_folder_holds_the_recorded_samples(recording, taught):
    _, _, _, samples = recording
    _, _, folder = taught
    with np.load(folder / "train.npz") as z:
        depth, imu, names = z["x_depth"], z["x_imu"], z.files
    train = [s for s in samples if s[2] == "train"]
    assert len(depth) == len(train) == 18 and not [n for n in names if n.startswith("present_")]   # all present
    np.testing.assert_array_equal(depth[0], train[0][0]["depth"])     # the 16 frames come back exactly
    # the IMU, recorded at 50 Hz over a 3-4 s action, comes back on the window's grid: same signal
    orig = train[0][0]["imu"]
    back = np.stack([np.interp(np.linspace(0, 1, 192), np.linspace(0, 1, len(imu[0])), imu[0][:, c])
                     for c in range(6)], axis=1)
    assert np.corrcoef(orig[:, 0], back[:, 0])[0, 1] > 0.98


def test_taught_from_the_bag_and_replayed_into_a_new_bag(recording, taught, tmp_path):
    from mmcl_edge.runtime import Runtime

    root, bag, labels, _ = recording
    ws, result, _ = taught
    assert result["status"] == "published" and result["class_names"] == ["bowling", "swipe_left", "wave"]
    origin = ws.report()["tasks"][0]["origin"]
    assert origin["bag"] == str(bag.resolve()) and set(origin["bag_sha256"]) == {"metadata.yaml", "session.mcap"}
    heldout_acc = result["row"][0]
    assert heldout_acc >= 0.6, result["row"]                     # 3 classes: chance is 0.33
    rt = Runtime(ws.root, providers="cpu")
    out = tmp_path / "with_predictions"
    answers = list(replay(rt, bag, root / "topics.json", window=3.5, hop=1.0, out=out))
    with Bag(bag) as b:
        duration, counts, start_ns = b.duration, {t: c for t, (_, c) in b.topics.items()}, b.start_ns
    assert len(answers) == int((duration - 3.5) // 1.0) + 1
    assert all(set(a) >= {"start", "end", "label", "score", "modalities", "pack_version"} for a in answers)
    assert {a["label"] for a in answers} <= {"swipe_left", "wave", "bowling"}
    assert answers[0]["modalities"] == ["imu", "skeleton", "depth"]
    # answers over the labelled test windows mostly name their action
    rows = [r.split(",") for r in labels.read_text().splitlines()[1:]]
    hits = []
    for a0, a1, label, split in rows:
        mid = (float(a0) + float(a1)) / 2
        near = min(answers, key=lambda a: abs((a["start"] + a["end"]) / 2 - mid))
        hits.append(near["label"] == label)
    assert np.mean(hits) >= 0.6, hits
    with Bag(out) as b:
        assert {t: c for t, (_, c) in b.topics.items() if t != PREDICTION_TOPIC} == counts   # every input message
        assert b.topics[PREDICTION_TOPIC] == ("std_msgs/msg/String", len(answers))
        got = [(ns, json.loads(msg.data)) for _, ns, msg in b.messages([PREDICTION_TOPIC])]
    assert [doc for _, doc in got] == answers
    assert [ns for ns, _ in got] == [start_ns + int(round(a["end"] * 1e9)) for a in answers]   # stamped at the end
    assert not list(tmp_path.glob(".with_predictions.partial-*"))


# -- the command line ----------------------------------------------------------------------------------

def cli(*args):
    from typer.testing import CliRunner

    from mmcl_edge.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_bag_inspect(recording):
    root, bag, _, _ = recording
    r = cli("bag", "inspect", bag, "--json")
    assert r.exit_code == 0, r.output
    rows = {t["topic"]: t for t in json.loads(r.output)["topics"]}
    assert rows["/watch/imu"]["type"] == "sensor_msgs/msg/Imu" and rows["/watch/imu"]["rate_hz"] == pytest.approx(50, rel=0.05)
    assert rows["/kinect/skeleton"]["type"] == "std_msgs/msg/Float32MultiArray"
    assert rows["/kinect/depth/image_raw"]["rate_hz"] == pytest.approx(15, rel=0.05)
    table = cli("bag", "inspect", bag)
    assert table.exit_code == 0 and "rate (Hz)" in table.output
    folded = "".join(table.output.split())          # a narrow terminal folds long names onto more lines
    assert "/watch/imu" in folded or "/watch/im" in folded, table.output


def test_cli_predict_bag_json_lines_and_output_bag(recording, taught, tmp_path):
    root, bag, _, _ = recording
    ws, _, _ = taught
    r = cli("predict", "-w", ws.root, "--bag", bag, "--topics", root / "topics.json", "--window", 3.0, "--hop", 2.0,
            "--json", "--out", tmp_path / "pred", "--provider", "cpu")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) >= 10 and lines[0]["start"] == 0.0 and lines[0]["end"] == 3.0
    assert all(set(x) >= {"start", "end", "label", "score", "modalities", "pack_version"} for x in lines)
    with Bag(tmp_path / "pred") as b:
        assert b.topics[PREDICTION_TOPIC][1] == len(lines)
    table = cli("predict", "-w", ws.root, "--bag", bag, "--topics", root / "topics.json", "--window", 3.0,
                "--hop", 5.0, "--provider", "cpu")
    assert table.exit_code == 0 and "pack" in table.output and "v0000" in table.output, table.output


@pytest.mark.parametrize("case", ["no topics", "missing topic", "wrong type", "unreadable", "out exists",
                                  "unknown modality", "labels outside"])
def test_cli_bad_bag_input_is_one_error_line(recording, taught, tmp_path, case):
    root, bag, labels, _ = recording
    ws, _, _ = taught
    topics = dict(UTD_TOPICS)
    args = ["predict", "-w", ws.root, "--bag", bag, "--topics", tmp_path / "t.json", "--provider", "cpu"]
    if case == "no topics":
        args = args[:5]
    elif case == "missing topic":
        topics["imu"] = {"topic": "/phone/imu", "kind": "timeseries"}
    elif case == "wrong type":
        topics["skeleton"] = {"topic": "/watch/imu", "kind": "video"}
    elif case == "unreadable":
        (tmp_path / "x.bag").write_bytes(b"#ROSBAG V2.0\n" + bytes(64))
        args[4] = tmp_path / "x.bag"
    elif case == "out exists":
        (tmp_path / "o").mkdir()
        args += ["--out", tmp_path / "o"]
    elif case == "unknown modality":
        topics["audio"] = {"topic": "/mic", "kind": "timeseries"}
    (tmp_path / "t.json").write_text(json.dumps(topics))
    if case == "labels outside":                  # teach --bag, into the taught workspace and into a new one
        (tmp_path / "l.csv").write_text("start,end,label\n1,2,wave\n500,503,wave\n")
        args = ["teach", "-w", ws.root, "--bag", bag, "--topics", tmp_path / "t.json", "--labels", tmp_path / "l.csv"]
    before = sorted(p.relative_to(ws.root) for p in ws.root.rglob("*"))
    r = cli(*args)
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.output, r.output
    assert sorted(p.relative_to(ws.root) for p in ws.root.rglob("*")) == before
    assert not list(tmp_path.glob(".*partial*")) and not list(ws.root.parent.glob(".ws.bag-*"))
    if case == "labels outside":
        args[2] = tmp_path / "new_ws"
        r = cli(*args)
        assert r.exit_code == 2 and "line 3 (500-503 s, 'wave') is outside the recording" in r.output, r.output
        assert not (tmp_path / "new_ws").exists() and not list(tmp_path.glob(".new_ws.bag-*"))
