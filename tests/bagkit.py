"""Real bags for tests and benchmarks, written with rosbags' own writers (no ROS installed):
sensor streams with header stamps that jitter, receive times that lag, the odd dropped message,
and UTD-MHAD recordings (IMU as Imu at 50 Hz, skeleton as JointState or Float32MultiArray at
30 Hz, depth as 16UC1 Image) laid end to end with a LABELS.csv for them."""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def store(ros1: bool = False):
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)


@dataclass
class Stream:
    """One topic: (header stamp ns, message builder args) pairs turned into messages on write."""
    topic: str
    msgtype: str
    messages: list = field(default_factory=list)     # (receive ns, message)


class Messages:
    """Builds messages of one typestore (ROS 2, or ROS 1 whose Header has a seq)."""

    def __init__(self, ros1: bool = False):
        self.ros1 = ros1
        self.ts = store(ros1)
        self.T = self.ts.types

    def header(self, ns: int, frame: str = "base"):
        t = self.T["builtin_interfaces/msg/Time"](sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
        if self.ros1:
            return self.T["std_msgs/msg/Header"](seq=0, stamp=t, frame_id=frame)
        return self.T["std_msgs/msg/Header"](stamp=t, frame_id=frame)

    def vec3(self, v):
        return self.T["geometry_msgs/msg/Vector3"](x=float(v[0]), y=float(v[1]), z=float(v[2]))

    def imu(self, ns: int, acc, gyro, quat=(0.0, 0.0, 0.0, 1.0)):
        q = self.T["geometry_msgs/msg/Quaternion"](x=quat[0], y=quat[1], z=quat[2], w=quat[3])
        zeros = np.zeros(9, np.float64)
        return self.T["sensor_msgs/msg/Imu"](header=self.header(ns, "imu"), orientation=q, orientation_covariance=zeros,
                                             angular_velocity=self.vec3(gyro), angular_velocity_covariance=zeros,
                                             linear_acceleration=self.vec3(acc), linear_acceleration_covariance=zeros)

    def vector3_stamped(self, ns: int, v):
        return self.T["geometry_msgs/msg/Vector3Stamped"](header=self.header(ns), vector=self.vec3(v))

    def joint_state(self, ns: int, positions):
        n = len(positions)
        return self.T["sensor_msgs/msg/JointState"](header=self.header(ns, "skeleton"), name=[f"j{i}" for i in range(n)],
                                                    position=np.asarray(positions, np.float64),
                                                    velocity=np.zeros(0), effort=np.zeros(0))

    def float32_multiarray(self, values, dims=None):
        Dim = self.T["std_msgs/msg/MultiArrayDimension"]
        values = np.asarray(values, np.float32)
        dims = dims or [values.size]
        layout = self.T["std_msgs/msg/MultiArrayLayout"](
            dim=[Dim(label=f"d{i}", size=int(d), stride=int(np.prod(dims[i:]))) for i, d in enumerate(dims)], data_offset=0)
        return self.T["std_msgs/msg/Float32MultiArray"](layout=layout, data=values.reshape(-1))

    def image(self, ns: int, arr: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False):
        arr = np.asarray(arr)
        h, w = arr.shape[:2]
        a = arr.astype(arr.dtype.newbyteorder(">" if bigendian else "<"))
        rows = a.reshape(h, -1).view(np.uint8)
        if pad:
            rows = np.concatenate([rows, np.zeros((h, pad), np.uint8)], axis=1)
        return self.T["sensor_msgs/msg/Image"](header=self.header(ns, "camera"), height=h, width=w, encoding=encoding,
                                               is_bigendian=int(bigendian), step=rows.shape[1],
                                               data=np.ascontiguousarray(rows).reshape(-1))

    def compressed(self, ns: int, data: bytes, fmt: str):
        return self.T["sensor_msgs/msg/CompressedImage"](header=self.header(ns, "camera"), format=fmt,
                                                         data=np.frombuffer(data, np.uint8).copy())

    def string(self, text: str):
        return self.T["std_msgs/msg/String"](data=text)


def write_bag(path: Path, streams: list[Stream], storage: str = "sqlite3", ros1: bool | None = None) -> Path:
    """Write ``streams`` in receive-time order: ``storage`` sqlite3 or mcap (a rosbag2 folder), or
    ``ros1`` (a .bag file; ``path`` must end in .bag)."""
    path = Path(path)
    ros1 = path.suffix == ".bag" if ros1 is None else ros1
    ts = store(ros1)
    merged = heapq.merge(*[[(ns, i, k) for k, (ns, _) in enumerate(s.messages)] for i, s in enumerate(streams)])
    if ros1:
        from rosbags.rosbag1 import Writer as Writer1

        with Writer1(path) as w:
            conns = [w.add_connection(s.topic, s.msgtype, typestore=ts) for s in streams]
            for ns, i, k in merged:
                w.write(conns[i], ns, ts.serialize_ros1(streams[i].messages[k][1], streams[i].msgtype))
        return path
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as w:
        conns = [w.add_connection(s.topic, s.msgtype, typestore=ts) for s in streams]
        for ns, i, k in merged:
            w.write(conns[i], ns, ts.serialize_cdr(streams[i].messages[k][1], streams[i].msgtype))
    return path


class Clock:
    """Sensor timing: stamps on a nominal grid with jitter, receive = stamp + a lagging delay, drops."""

    def __init__(self, seed: int = 0, jitter_s: float = 0.001, latency_s: float = 0.008, drop: float = 0.01):
        self.rng = np.random.default_rng(seed)
        self.jitter, self.latency, self.drop = jitter_s, latency_s, drop

    def times(self, t0: float, n: int, rate: float, origin_ns: int) -> list[tuple[int, int, int]]:
        """(index, stamp ns, receive ns) for ``n`` messages at cell centres of ``rate`` from ``t0``, some dropped."""
        out = []
        for k in range(n):
            if self.drop and self.rng.random() < self.drop:
                continue
            t = t0 + (k + 0.5) / rate + self.rng.normal(0, self.jitter)
            stamp = origin_ns + int(round(t * 1e9))
            out.append((k, stamp, stamp + int(round(self.rng.exponential(self.latency) * 1e9)) + 1_000_000))
        return out


ORIGIN_NS = 1_700_000_000 * 1_000_000_000          # a realistic wall-clock epoch


def resample(x: np.ndarray, n: int) -> np.ndarray:
    """Linear resampling of ``x`` [T, ...] to ``n`` steps at cell centres."""
    t_in = (np.arange(len(x)) + 0.5) / len(x)
    t_out = (np.arange(n) + 0.5) / n
    flat = x.reshape(len(x), -1).astype(np.float64)
    return np.stack([np.interp(t_out, t_in, flat[:, c]) for c in range(flat.shape[1])], axis=1).reshape((n,) + x.shape[1:])


UTD_TOPICS = {"imu": {"topic": "/watch/imu", "kind": "timeseries"},
              "skeleton": {"topic": "/kinect/skeleton", "kind": "timeseries"},
              "depth": {"topic": "/kinect/depth/image_raw", "kind": "video", "frames": 16}}


def utd_recording(samples: list[tuple[dict, str, str]], skeleton_as: str = "joint_state", seed: int = 0,
                  imu_hz: float = 50.0, skeleton_hz: float = 30.0, depth_hz: float = 15.0, rest_s: float = 0.6,
                  durations: tuple[float, float] = (3.0, 4.0), ros1: bool = False):
    """UTD-MHAD samples (``({"imu": [192, 6], "skeleton": [64, 60], "depth": [16, H, W]}, label, split)``)
    performed one after another: each action lasts a random 3-4 s, the sensors keep streaming
    through the rests between actions (holding their last reading). Returns (streams, label rows
    relative to the bag's first message)."""
    rng = np.random.default_rng(seed)
    clock = Clock(seed)
    mk = Messages(ros1)
    imu = Stream("/watch/imu", "sensor_msgs/msg/Imu")
    skel = Stream("/kinect/skeleton", "sensor_msgs/msg/JointState" if skeleton_as == "joint_state"
                  else "std_msgs/msg/Float32MultiArray")
    depth = Stream("/kinect/depth/image_raw", "sensor_msgs/msg/Image")
    rows, t = [], rest_s
    segments = []                                   # (t0, seconds, imu, skeleton, depth) incl. rests
    prev = None
    for x, label, split in samples:
        first = (x["imu"][:1], x["skeleton"][:1], x["depth"][:1])
        hold = prev or first
        segments.append((t - rest_s, rest_s, *hold))
        d = float(rng.uniform(*durations))
        segments.append((t, d, x["imu"], x["skeleton"], x["depth"]))
        rows.append((t, t + d, label, split))
        prev = (x["imu"][-1:], x["skeleton"][-1:], x["depth"][-1:])
        t += d + rest_s
    segments.append((t - rest_s, rest_s, *prev))
    for t0, d, xi, xs, xd in segments:
        for stream, rate, x in ((imu, imu_hz, xi), (skel, skeleton_hz, xs), (depth, depth_hz, xd)):
            n = max(1, int(round(d * rate)))
            if stream is depth:                        # frames shown at rate: nearest source frame
                values = x[np.minimum(((np.arange(n) + 0.5) / n * len(x)).astype(int), len(x) - 1)]
            else:
                values = resample(x, n)
            for k, stamp, recv in clock.times(t0, n, n / d, ORIGIN_NS):
                v = values[k]
                if stream is imu:
                    msg = mk.imu(stamp, v[:3], v[3:6])
                elif stream is skel:
                    msg = mk.joint_state(stamp, v) if skeleton_as == "joint_state" else \
                        mk.float32_multiarray(v.reshape(20, 3), [20, 3])
                else:
                    msg = mk.image(stamp, v.astype(np.uint16), "16UC1")
                stream.messages.append((recv, msg))
    first_recv = min(s.messages[0][0] for s in (imu, skel, depth))
    shift = (first_recv - ORIGIN_NS) / 1e9
    labels = [(a - shift, b - shift, label, split) for a, b, label, split in rows]
    return [imu, skel, depth], labels


def write_labels(path: Path, rows, split: bool = True) -> Path:
    lines = ["start,end,label" + (",split" if split else "")]
    for a, b, label, s in rows:
        lines.append(f"{a:.6f},{b:.6f},{label}" + (f",{s}" if split else ""))
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def utd_samples(utd_dir: Path, classes: list[int], per_split: dict[str, int] | None = None,
                folder: str = "utd-mhad-cross-subject"):
    """UTD-MHAD samples of ``classes`` from train.npz and test.npz (all of them, or the first
    ``per_split[split]`` per class), as (sample dict, class name, split) in file order."""
    import json

    names = json.loads((utd_dir / folder / "modalities.json").read_text())["class_names"]
    out = []
    for split in ("train", "test"):
        with np.load(utd_dir / folder / f"{split}.npz") as z:
            y = z["y"]
            keep = []
            for c in classes:
                idx = np.flatnonzero(y == c)
                keep += list(idx[: (per_split or {}).get(split, len(idx))])
            keep = sorted(keep)
            xi, xs, xd = z["x_imu"][keep], z["x_skeleton"][keep], z["x_depth"][keep]
        out += [({"imu": xi[i], "skeleton": xs[i], "depth": xd[i]}, names[int(y[j])], split)
                for i, j in enumerate(keep)]
    return out
