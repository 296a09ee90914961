"""Bags in, samples out (issue 18): real bags written with rosbags (sqlite3, MCAP, ROS 1), read
back through mmcl_edge.ros; no ROS installation, no mocks."""
from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("rosbags")

from bagkit import ORIGIN_NS, Clock, Messages, Stream, write_bag, write_labels  # noqa: E402

from mmcl_edge.errors import DataFormatError  # noqa: E402
from mmcl_edge.ros import Bag, SensorWindow, bag_to_task_folder, load_topics  # noqa: E402
from mmcl_edge.ros.messages import compressed_array, converter, image_array  # noqa: E402

MK = Messages()


def sine(t):
    """Three channels of smooth signal: what an accelerometer might give."""
    return np.stack([np.sin(2 * np.pi * 0.5 * t), np.cos(2 * np.pi * 0.3 * t), 0.1 * t], axis=-1)


def synthetic_streams(seconds=12.0, silent=(4.0, 6.0), ros1=False, seed=0):
    """An IMU at 100 Hz, a Vector3Stamped at 20 Hz silent during ``silent``, a 4x5 mono16 camera at 5 Hz."""
    mk = Messages(ros1)
    clock = Clock(seed, jitter_s=0.0005, latency_s=0.004, drop=0.0)
    imu = Stream("/imu", "sensor_msgs/msg/Imu")
    vec = Stream("/wind", "geometry_msgs/msg/Vector3Stamped")
    cam = Stream("/cam", "sensor_msgs/msg/Image")
    for k, stamp, recv in clock.times(0.0, int(seconds * 100), 100, ORIGIN_NS):
        t = (stamp - ORIGIN_NS) / 1e9
        v = sine(t)
        imu.messages.append((recv, mk.imu(stamp, v, -v)))
    for k, stamp, recv in clock.times(0.0, int(seconds * 20), 20, ORIGIN_NS):
        t = (stamp - ORIGIN_NS) / 1e9
        if not silent[0] <= t <= silent[1]:
            vec.messages.append((recv, mk.vector3_stamped(stamp, 2 * sine(t))))
    for k, stamp, recv in clock.times(0.0, int(seconds * 5), 5, ORIGIN_NS):
        cam.messages.append((recv, mk.image(stamp, np.full((4, 5), k, np.uint16), "mono16")))
    return [imu, vec, cam]


TOPICS = {"accel": {"topic": "/imu", "kind": "timeseries"},
          "wind": {"topic": "/wind", "kind": "timeseries", "steps": 20},
          "cam": {"topic": "/cam", "kind": "video", "frames": 4}}


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    streams = synthetic_streams()
    out = {"sqlite3": write_bag(root / "sq", streams, "sqlite3"), "mcap": write_bag(root / "mc", streams, "mcap"),
           "ros1": write_bag(root / "r1.bag", synthetic_streams(ros1=True))}
    (root / "topics.json").write_text(json.dumps(TOPICS))
    return root, out


# -- message converters -------------------------------------------------------------------------

def test_imu_gives_six_channels_and_orientation_when_asked():
    msg = MK.imu(ORIGIN_NS, [1, 2, 3], [4, 5, 6], quat=(0.1, 0.2, 0.3, 0.9))
    plain = load_topics({"a": {"topic": "/imu", "kind": "timeseries"}})["a"]
    full = load_topics({"a": {"topic": "/imu", "kind": "timeseries", "orientation": True}})["a"]
    np.testing.assert_allclose(converter(plain, "sensor_msgs/msg/Imu")(msg), [1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(converter(full, "sensor_msgs/msg/Imu")(msg), [1, 2, 3, 4, 5, 6, 0.1, 0.2, 0.3, 0.9],
                               rtol=1e-6)


def test_joint_state_multiarray_and_fields():
    ts = load_topics({"a": {"topic": "/x", "kind": "timeseries"}})["a"]
    np.testing.assert_allclose(converter(ts, "sensor_msgs/msg/JointState")(MK.joint_state(1, [0.5, -1, 2])), [0.5, -1, 2])
    arr = converter(ts, "std_msgs/msg/Float32MultiArray")(MK.float32_multiarray(np.arange(6), [2, 3]))
    assert arr.shape == (2, 3) and arr[1, 2] == 5
    twist = MK.T["geometry_msgs/msg/Twist"](linear=MK.vec3([1, 2, 3]), angular=MK.vec3([4, 5, 6]))
    picked = load_topics({"a": {"topic": "/cmd", "kind": "timeseries", "fields": ["linear.x", "angular.z"]}})["a"]
    np.testing.assert_allclose(converter(picked, "geometry_msgs/msg/Twist")(twist), [1, 6])
    with pytest.raises(DataFormatError, match="no built-in converter.*fields"):
        converter(ts, "geometry_msgs/msg/Twist")
    bad = load_topics({"a": {"topic": "/cmd", "kind": "timeseries", "fields": ["linear.w"]}})["a"]
    with pytest.raises(DataFormatError, match="no field 'linear.w'"):
        converter(bad, "geometry_msgs/msg/Twist")(twist)


@pytest.mark.parametrize("encoding,dtype,channels", [("mono8", np.uint8, 1), ("mono16", np.uint16, 1),
                                                     ("16UC1", np.uint16, 1), ("32FC1", np.float32, 1),
                                                     ("rgb8", np.uint8, 3), ("bgr8", np.uint8, 3)])
@pytest.mark.parametrize("bigendian,pad", [(False, 0), (True, 6)])
def test_image_encodings_rows_and_byte_order(encoding, dtype, channels, bigendian, pad):
    rng = np.random.default_rng(0)
    shape = (5, 7, 3) if channels == 3 else (5, 7)
    img = (rng.random(shape) * 200).astype(dtype)
    got = image_array(MK.image(1, img, encoding, pad=pad, bigendian=bigendian), "/cam")
    want = img[..., ::-1] if encoding == "bgr8" else img          # bgr8 comes back as RGB
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_array_equal(got, want)


def test_float_depth_no_reading_is_zero_and_unknown_encoding_is_named():
    depth = np.array([[1.5, np.nan], [np.inf, 2.0]], np.float32)
    np.testing.assert_array_equal(image_array(MK.image(1, depth, "32FC1")), [[1.5, 0], [0, 2.0]])
    msg = MK.image(1, np.zeros((2, 2), np.uint8), "mono8")
    msg.encoding = "yuv422"
    with pytest.raises(DataFormatError, match="topic /cam: image encoding 'yuv422' is not supported"):
        image_array(msg, "/cam")


def test_compressed_png_jpeg_and_depth():
    from PIL import Image

    def encode(arr, fmt):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        return buf.getvalue()

    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(compressed_array(MK.compressed(1, encode(rgb, "PNG"), "png")), rgb)
    assert compressed_array(MK.compressed(1, encode(rgb, "JPEG"), "jpeg")).shape == (6, 8, 3)
    depth = np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000
    msg = MK.compressed(1, bytes(12) + encode(depth, "PNG"), "16UC1; compressedDepth png")
    np.testing.assert_array_equal(compressed_array(msg), depth)
    with pytest.raises(DataFormatError, match="cannot be decoded"):
        compressed_array(MK.compressed(1, b"not an image", "png"), "/cam")


def test_kind_and_type_must_fit():
    with pytest.raises(DataFormatError, match="/cam has type sensor_msgs/msg/Image: it can feed an image or video"):
        converter(load_topics({"a": {"topic": "/cam", "kind": "timeseries"}})["a"], "sensor_msgs/msg/Image")
    with pytest.raises(DataFormatError, match="/imu has type sensor_msgs/msg/Imu: it can feed a timeseries or vector"):
        converter(load_topics({"a": {"topic": "/imu", "kind": "video"}})["a"], "sensor_msgs/msg/Imu")
    with pytest.raises(DataFormatError, match="expects sensor_msgs/msg/Imu"):
        converter(load_topics({"a": {"topic": "/x", "kind": "timeseries", "type": "sensor_msgs/msg/Imu"}})["a"],
                  "sensor_msgs/msg/JointState")


@pytest.mark.parametrize("topics,match", [
    ({"a": {"kind": "timeseries"}}, "needs \"topic\""),
    ({"a": {"topic": "/a", "kind": "sound"}}, "kind 'sound'"),
    ({"a": {"topic": "/a", "kind": "timeseries", "time": "sensor"}}, "\"time\" must be"),
    ({"a": {"topic": "/a", "kind": "timeseries", "rate": 3}}, "unknown keys \\['rate'\\]"),
    ({"a": {"topic": "/a", "kind": "video", "steps": 10}}, "\"steps\" is for timeseries"),
    ({"a b": {"topic": "/a", "kind": "timeseries"}}, "plain identifier"),
])
def test_topics_json_mistakes_are_named(topics, match):
    with pytest.raises(DataFormatError, match=match):
        load_topics(topics)


# -- SensorWindow -----------------------------------------------------------------------------------

def push_all(sw, streams):
    """Push every message in receive order (as a bag or a live node delivers them); collect windows."""
    merged = sorted((recv, i, k) for i, s in enumerate(streams) for k, (recv, _) in enumerate(s.messages))
    out = []
    for recv, i, k in merged:
        out += sw.push(streams[i].topic, recv, streams[i].messages[k][1])
    return out + sw.flush()


def test_window_resamples_onto_its_grid_from_header_stamps():
    streams = synthetic_streams()
    sw = SensorWindow(TOPICS, origin_ns=ORIGIN_NS)
    sw.schedule(1.0, 3.0, "a")
    sw.schedule(4.2, 5.8, "b")                     # /wind is silent here: absent, not zeros
    got = {w.key: w for w in push_all(sw, streams)}
    a = got["a"].sample
    assert set(a) == {"accel", "wind", "cam"}
    grid = 1.0 + (np.arange(200) + 0.5) * 2.0 / 200          # 2 s x 100 Hz measured from the stamps
    assert a["accel"].shape == (200, 6)
    np.testing.assert_allclose(a["accel"][:, :3], sine(grid), atol=2e-3)
    np.testing.assert_allclose(a["accel"][:, 3:], -sine(grid), atol=2e-3)
    np.testing.assert_allclose(a["wind"], 2 * sine(1.0 + (np.arange(20) + 0.5) * 0.1), atol=2e-2)  # "steps": 20
    assert a["cam"].shape == (4, 4, 5) and a["cam"].dtype == np.uint16
    np.testing.assert_array_equal(a["cam"][:, 0, 0], [6, 8, 11, 13])   # nearest frames to 1.25, 1.75, 2.25, 2.75 s
    assert set(got["b"].sample) == {"accel", "cam"}
    assert sw.rates()["accel"] == pytest.approx(100, rel=0.02)


def test_receive_time_when_asked_or_without_header():
    """A camera whose header stamps run 0.5 s behind: "time": "receive" aligns it by arrival instead."""
    mk = Messages()
    cam = Stream("/cam", "sensor_msgs/msg/Image")
    for k in range(50):
        recv = ORIGIN_NS + int(k * 0.1e9)
        cam.messages.append((recv, mk.image(recv - int(0.5e9), np.full((2, 2), k, np.uint8), "mono8")))
    by_header = SensorWindow({"cam": {"topic": "/cam", "kind": "image"}}, origin_ns=ORIGIN_NS)
    by_receive = SensorWindow({"cam": {"topic": "/cam", "kind": "image", "time": "receive"}}, origin_ns=ORIGIN_NS)
    for sw in (by_header, by_receive):
        sw.schedule(2.0, 2.2)
        push_all(sw, [cam])
    assert by_header.sample(2.0, 2.2)["cam"][0, 0] == 26       # stamped 2.1 s = received 2.6 s
    assert by_receive.sample(2.0, 2.2)["cam"][0, 0] == 21
    strings = SensorWindow({"note": {"topic": "/note", "kind": "timeseries", "fields": ["data"]}}, origin_ns=0)
    strings.push("/note", 1_000_000_000, MK.T["std_msgs/msg/Float64"](data=3.0))   # no header: receive time
    assert strings.sample(0.9, 1.1)["note"].shape[1] == 1


def test_sliding_windows_come_in_order_and_buffers_stay_bounded():
    streams = synthetic_streams(seconds=30.0)
    sw = SensorWindow(TOPICS, window=2.0, hop=0.5, origin_ns=ORIGIN_NS)
    merged = sorted((recv, i, k) for i, s in enumerate(streams) for k, (recv, _) in enumerate(s.messages))
    wins, longest = [], 0
    for recv, i, k in merged:
        wins += sw.push(streams[i].topic, recv, streams[i].messages[k][1])
        longest = max(longest, len(sw.tracks["accel"].times))
    wins += sw.flush()
    starts = [w.start for w in wins]
    assert starts == sorted(starts) and starts[0] == 0.0 and np.allclose(np.diff(starts), 0.5)
    assert len(wins) == 56 and wins[-1].end == 29.5      # the last stamp is 29.995 s: [28, 30] is not complete
    assert longest < 2.0 * 100 + 0.25 * 100 + 60          # one window plus lateness, not the whole stream
    assert all(w.sample["accel"].shape == (200, 6) for w in wins)


# -- bags -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sqlite3", "mcap", "ros1"])
def test_inspect_lists_topics_types_counts_rates(bags, kind):
    root, paths = bags
    with Bag(paths[kind]) as b:
        info = b.inspect()
    rows = {r["topic"]: r for r in info["topics"]}
    assert rows["/imu"]["type"] == "sensor_msgs/msg/Imu" and rows["/imu"]["count"] == 1200
    assert rows["/imu"]["rate_hz"] == pytest.approx(100, rel=0.02)
    assert rows["/wind"]["type"] == "geometry_msgs/msg/Vector3Stamped" and rows["/cam"]["rate_hz"] == pytest.approx(5, rel=0.05)
    assert info["duration"] == pytest.approx(12.0, abs=0.05)


def test_bare_mcap_file_reads_like_its_folder(bags):
    root, paths = bags
    file = next(paths["mcap"].glob("*.mcap"))
    with Bag(file) as a, Bag(paths["mcap"]) as b:
        assert a.inspect()["topics"] == b.inspect()["topics"]


@pytest.mark.parametrize("kind", ["sqlite3", "mcap", "ros1"])
def test_bag_to_task_folder(bags, tmp_path, kind):
    root, paths = bags
    labels = write_labels(tmp_path / "labels.csv", [(1.0, 3.0, "wave", "train"), (4.2, 5.8, "rest", "train"),
                                                    (7.0, 9.0, "wave", "test"), (9.0, 11.5, "rest", "test")])
    out = bag_to_task_folder(paths[kind], root / "topics.json", labels, tmp_path / "task")
    spec = json.loads((out / "modalities.json").read_text())
    assert spec["class_names"] == ["rest", "wave"] and spec["cam"] == {"kind": "video", "frames": 4}
    with np.load(out / "train.npz") as z:
        tr = dict(z)
    with np.load(out / "test.npz") as z:
        te = dict(z)
    assert tr["y"].tolist() == [1, 0] and te["y"].tolist() == [1, 0]
    steps = round(2.5 * 1200 / 12.0)                 # longest row x the topic's mean rate
    assert tr["x_accel"].shape == (2, steps, 6) and te["x_wind"].shape == (2, 20, 3)
    assert tr["present_wind"].tolist() == [True, False] and not tr["x_wind"][1].any()   # absent: zeros, marked
    assert "present_accel" not in tr and "present_wind" not in te and tr["x_cam"].shape == (2, 4, 4, 5)
    with Bag(paths[kind]) as b:
        first = (b.start_ns - ORIGIN_NS) / 1e9        # label times count from the bag's first message
    grid = 7.0 + (np.arange(steps) + 0.5) * 2.0 / steps
    np.testing.assert_allclose(te["x_accel"][0, :, :3], sine(first + grid), atol=2e-3)
    origin = json.loads((out / "origin.json").read_text())
    for name, digest in origin["bag_sha256"].items():
        f = paths[kind] / name if paths[kind].is_dir() else paths[kind]
        assert hashlib.sha256(f.read_bytes()).hexdigest() == digest
    assert origin["rows"] == {"train": 2, "test": 2}


def test_rows_without_split_are_train_and_no_test_file(bags, tmp_path):
    root, paths = bags
    labels = write_labels(tmp_path / "l.csv", [(1.0, 3.0, "a", ""), (3.0, 5.0, "b", "")], split=False)
    out = bag_to_task_folder(paths["mcap"], root / "topics.json", labels, tmp_path / "task")
    assert sorted(p.name for p in out.iterdir()) == ["modalities.json", "origin.json", "train.npz"]


# -- bad input: one plain error each, nothing written ---------------------------------------------

def bad_case(bags, tmp_path, case):
    root, paths = bags
    topics, labels, bag = dict(TOPICS), [(1.0, 3.0, "a", "train")], paths["sqlite3"]
    if case == "missing topic":
        topics["gps"] = {"topic": "/gps", "kind": "timeseries"}
    elif case == "wrong type":
        topics["accel"] = {"topic": "/cam", "kind": "timeseries"}
    elif case == "outside":
        labels.append((10.0, 13.5, "b", "train"))
    elif case == "unreadable":
        bag = tmp_path / "junk.mcap"
        bag.write_bytes(b"\x89MCAP0\r\n" + bytes(100))
    elif case == "no metadata":
        bag = tmp_path / "empty"
        bag.mkdir()
    elif case == "truncated":
        bag = tmp_path / "cut"
        bag.mkdir()
        (bag / "metadata.yaml").write_bytes((paths["sqlite3"] / "metadata.yaml").read_bytes())
        db = next(paths["sqlite3"].glob("*.db3"))
        (bag / db.name).write_bytes(db.read_bytes()[:5000])
    elif case == "uncovered":
        pass
    (tmp_path / "t.json").write_text(json.dumps(topics))
    rows = labels if case != "uncovered" else [(1.0, 3.0, "a", "train")]
    write_labels(tmp_path / "l.csv", rows)
    return bag, tmp_path / "t.json", tmp_path / "l.csv"


@pytest.mark.parametrize("case,match", [
    ("missing topic", "topic /gps is not in the bag .* \\(it has: /cam, /imu, /wind\\)"),
    ("wrong type", "topic /cam has type sensor_msgs/msg/Image: it can feed an image or video modality, not a timeseries"),
    ("outside", "l.csv line 3 \\(10-13.5 s, 'b'\\) is outside the recording \\(0-11.9"),
    ("unreadable", "cannot read the bag .*junk.mcap"),
    ("no metadata", "cannot read the bag .*empty"),
    ("truncated", "cannot read the bag .*cut"),
])
def test_bad_input_is_one_plain_error_and_writes_nothing(bags, tmp_path, case, match):
    bag, topics, labels = bad_case(bags, tmp_path, case)
    with pytest.raises(DataFormatError, match=match):
        bag_to_task_folder(bag, topics, labels, tmp_path / "task")
    assert not (tmp_path / "task").exists()


def test_a_window_no_topic_covers_names_its_row(tmp_path):
    mk = Messages()
    s = Stream("/imu", "sensor_msgs/msg/Imu")
    for t in list(np.arange(0, 2, 0.01)) + list(np.arange(5, 7, 0.01)):
        ns = ORIGIN_NS + int(t * 1e9)
        s.messages.append((ns, mk.imu(ns, [t, 0, 0], [0, 0, 0])))
    bag = write_bag(tmp_path / "gap", [s], "mcap")
    (tmp_path / "t.json").write_text(json.dumps({"accel": {"topic": "/imu", "kind": "timeseries"}}))
    labels = write_labels(tmp_path / "l.csv", [(0.5, 1.5, "a", "train"), (2.5, 4.5, "b", "train")])
    with pytest.raises(DataFormatError, match=r"l.csv line 3 \(2.5-4.5 s, 'b'\): no topic has a message in this window"):
        bag_to_task_folder(bag, tmp_path / "t.json", labels, tmp_path / "task")
    assert not (tmp_path / "task").exists()


def test_ros_package_imports_without_torch():
    code = "import sys, mmcl_edge.ros; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rclpy_shaped_messages_convert_like_rosbags_ones():
    """rclpy's messages carry no __msgtype__ (the type is their module and class) and hold uint8[]
    as array.array / bytes and float64[] as array.array; a stand-in built that way (rclpy cannot run here)."""
    import array
    import types

    def rclpy_type(module, name, **fields):
        cls = type(name, (), {"__module__": module})
        obj = cls()
        obj.__dict__.update(fields)
        return obj

    stamp = types.SimpleNamespace(sec=1_700_000_002, nanosec=500_000_000)
    img = rclpy_type("sensor_msgs.msg._image", "Image", header=types.SimpleNamespace(stamp=stamp), height=2, width=2,
                     encoding="16UC1", is_bigendian=0, step=4, data=array.array("B", [1, 0, 2, 0, 3, 0, 4, 1]))
    joints = rclpy_type("sensor_msgs.msg._joint_state", "JointState", header=types.SimpleNamespace(stamp=stamp),
                        position=array.array("d", [0.1, 0.2]))
    sw = SensorWindow({"depth": {"topic": "/d", "kind": "image"}, "pose": {"topic": "/j", "kind": "vector"}},
                      origin_ns=1_700_000_000 * 10**9)
    sw.push("/d", 0, img)
    sw.push("/j", 0, joints)
    got = sw.sample(2.0, 3.0)                   # placed by their header stamp (2.5 s), not the receive time
    np.testing.assert_array_equal(got["depth"], [[1, 2], [3, 260]])
    np.testing.assert_allclose(got["pose"], [0.1, 0.2], rtol=1e-6)


# -- replay through a real runtime (a small workspace taught from a bag) -----------------------------

SERIES_TOPICS = {"accel": {"topic": "/imu", "kind": "timeseries"}, "wind": {"topic": "/wind", "kind": "timeseries"}}


@pytest.fixture(scope="module")
def series_ws(bags, tmp_path_factory):
    """Two timeseries modalities (the fixed random-convolution encoder: no CNN, seconds to teach)."""
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.data.generic import read_task_folder
    from mmcl_edge.workspace import Workspace

    root, paths = bags
    work = tmp_path_factory.mktemp("series")
    (work / "topics.json").write_text(json.dumps(SERIES_TOPICS))
    rows = [(s, s + 1.0, "rising" if (s // 1) % 2 else "falling", "test" if s > 9 else "train")
            for s in np.arange(0.5, 11.0, 0.5)]
    folder = bag_to_task_folder(paths["sqlite3"], work / "topics.json", write_labels(work / "l.csv", rows), work / "task")
    specs, task = read_task_folder(folder)
    ws = Workspace.create_taught(work / "ws", specs, task.train, LearnConfig().override({"train.epochs": 2}))
    assert ws.learn_task(task)["status"] == "published"
    return ws, work / "topics.json"


@pytest.mark.parametrize("kind", ["sqlite3", "mcap", "ros1"])
def test_replay_writes_every_input_message_and_one_prediction_per_window(bags, series_ws, tmp_path, kind):
    from mmcl_edge.ros import PREDICTION_TOPIC, replay
    from mmcl_edge.runtime import Runtime

    root, paths = bags
    ws, topics = series_ws
    rt = Runtime(ws.root, providers="cpu")
    answers = list(replay(rt, paths[kind], topics, window=2.0, hop=0.5, out=tmp_path / "out"))
    assert [a["start"] for a in answers] == [0.5 * k for k in range(len(answers))] and len(answers) == 20
    assert {tuple(a["modalities"]) for a in answers} == {("accel", "wind"), ("accel",)}   # /wind pauses 4-6 s
    assert answers == list(replay(rt, paths[kind], topics, window=2.0, hop=0.5))          # same without --out
    with Bag(paths[kind]) as src, Bag(tmp_path / "out") as dst:
        assert dst.storage == "rosbag2 mcap"
        assert {t: v for t, v in dst.topics.items() if t != PREDICTION_TOPIC} == src.topics
        copied = [(t, ns, m.vector.x) for t, ns, m in dst.messages(["/wind"])]
        assert copied == [(t, ns, m.vector.x) for t, ns, m in src.messages(["/wind"])]    # ROS 1 converted to CDR
        docs = [json.loads(m.data) for _, _, m in dst.messages([PREDICTION_TOPIC])]
    assert docs == answers


def test_a_vector_is_one_flat_message_nearest_the_middle():
    sw = SensorWindow({"pose": {"topic": "/pose", "kind": "vector"}}, origin_ns=0)
    for k in range(10):
        sw.push("/pose", k * 100_000_000, MK.float32_multiarray(np.full(6, k), [2, 3]))   # no header: receive time
    v = sw.sample(0.25, 0.55)                       # middle 0.4 s: the message received at 0.4 s
    assert v["pose"].shape == (6,) and (v["pose"] == 4).all()


@pytest.mark.parametrize("args,match", [
    (["predict", "-w", "WS"], "give -i INPUT or --bag BAG"),
    (["predict", "-w", "WS", "-i", "x.npz", "--bag", "BAG"], "give -i INPUT or --bag BAG"),
    (["predict", "-w", "WS", "-i", "x.npz", "--out", "OUT"], "--out writes a bag: it goes with --bag"),
    (["teach", "-w", "WS"], "teach needs a task folder .* or a recording"),
    (["teach", "-w", "WS", "--bag", "BAG"], "--bag needs --topics TOPICS.json and --labels LABELS.csv"),
    (["teach", "-w", "WS", "--bag", "BAG", "--topics", "T", "--labels", "L"], "cannot read .*t.json: No such file"),
])
def test_cli_bag_options_are_checked_before_any_work(bags, tmp_path, args, match):
    from typer.testing import CliRunner

    from mmcl_edge.cli.main import app

    root, paths = bags
    subst = {"WS": tmp_path / "ws", "BAG": paths["mcap"], "T": tmp_path / "t.json", "L": tmp_path / "l.csv"}
    r = CliRunner().invoke(app, [str(subst.get(a, a)) for a in args])
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert re.search(match, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []          # no workspace, no temporary folder


def test_header_stamps_on_another_clock_say_what_to_do(tmp_path):
    """A sensor stamping with its time since boot: its messages fall outside every labelled window
    until TOPICS.json says "time": "receive"."""
    mk = Messages()
    s = Stream("/imu", "sensor_msgs/msg/Imu")
    for k in range(300):
        recv = ORIGIN_NS + k * 10_000_000
        s.messages.append((recv, mk.imu(42_000_000_000 + k * 10_000_000, [k, 0, 0], [0, 0, 0])))
    bag = write_bag(tmp_path / "boot", [s], "sqlite3")
    labels = write_labels(tmp_path / "l.csv", [(0.5, 1.5, "a", "train")])
    topics = {"accel": {"topic": "/imu", "kind": "timeseries"}}
    (tmp_path / "t.json").write_text(json.dumps(topics))
    with pytest.raises(DataFormatError, match="no topic has a message in this window.*\"time\": \"receive\""):
        bag_to_task_folder(bag, tmp_path / "t.json", labels, tmp_path / "task")
    topics["accel"]["time"] = "receive"
    (tmp_path / "t.json").write_text(json.dumps(topics))
    out = bag_to_task_folder(bag, tmp_path / "t.json", labels, tmp_path / "task")
    with np.load(out / "train.npz") as z:
        assert z["x_accel"][0, :, 0].min() >= 49 and z["x_accel"][0, :, 0].max() <= 151
