"""ROS messages -> numpy values, one converter per message type (rosbags' and rclpy's message
objects alike: both expose the same field names).

A converter turns one message into one value: a 1-D float vector (timeseries, vector), an image
``[H, W]`` or ``[H, W, C]`` (image, video), or a string (text).
"""
from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np

from mmcl_edge.errors import DataFormatError
from mmcl_edge.ros.topics import TopicSource

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
# encoding -> (dtype, channels); 32FC1 depth marks "no reading" as NaN, written as 0 (the video
# preprocessing's "no reading").
IMAGE_ENCODINGS = {"mono8": (np.uint8, 1), "8UC1": (np.uint8, 1), "mono16": (np.uint16, 1), "16UC1": (np.uint16, 1),
                   "32FC1": (np.float32, 1), "rgb8": (np.uint8, 3), "bgr8": (np.uint8, 3)}


def msgtype_of(msg) -> str:
    """``sensor_msgs/msg/Imu`` for a rosbags message (``__msgtype__``) or an rclpy one (its module)."""
    name = getattr(msg, "__msgtype__", None)
    if name:
        return name
    module = type(msg).__module__.split(".")                 # rclpy: sensor_msgs.msg._imu
    return f"{module[0]}/{module[1]}/{type(msg).__name__}" if len(module) >= 2 else type(msg).__name__


def header_stamp_ns(msg) -> int | None:
    """The header stamp in nanoseconds, or None when the message has no header or an unset (zero) stamp."""
    header = getattr(msg, "header", None)
    stamp = getattr(header, "stamp", None)
    if stamp is None:
        return None
    ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    return ns or None


def _vec3(v) -> list[float]:
    return [float(v.x), float(v.y), float(v.z)]


def _imu(orientation: bool) -> Callable:
    def convert(msg) -> np.ndarray:
        vals = _vec3(msg.linear_acceleration) + _vec3(msg.angular_velocity)
        if orientation:
            q = msg.orientation
            vals += [float(q.x), float(q.y), float(q.z), float(q.w)]
        return np.array(vals, np.float32)
    return convert


def _multiarray(msg) -> np.ndarray:
    """Float*MultiArray: its data, shaped by the layout's dimensions when they describe it."""
    data = np.asarray(msg.data, dtype=np.float32)
    dims = [int(d.size) for d in getattr(msg.layout, "dim", [])]
    if dims and int(np.prod(dims)) == data.size:
        return data.reshape(dims)
    return data


def _bytes(data) -> np.ndarray:
    return data if isinstance(data, np.ndarray) else np.frombuffer(bytes(data), np.uint8)


def image_array(msg, topic: str = "") -> np.ndarray:
    """sensor_msgs/msg/Image -> ``[H, W]`` or ``[H, W, 3]`` (RGB), honouring row padding and byte order."""
    enc = msg.encoding
    if enc not in IMAGE_ENCODINGS:
        raise DataFormatError(f"topic {topic}: image encoding {enc!r} is not supported "
                              f"(supported: {', '.join(IMAGE_ENCODINGS)})")
    dtype, ch = IMAGE_ENCODINGS[enc]
    dt = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    row = w * ch * dt.itemsize
    buf = _bytes(msg.data)
    if step < row or buf.size < h * step:
        raise DataFormatError(f"topic {topic}: a {w}x{h} {enc} image needs {h * max(step, row)} bytes, "
                              f"the message has {buf.size}")
    img = buf[:h * step].reshape(h, step)[:, :row].copy().view(dt).reshape(h, w, ch).astype(dtype)
    if enc == "32FC1":
        img[~np.isfinite(img)] = 0
    if enc == "bgr8":
        img = img[..., ::-1]
    return img[..., 0] if ch == 1 else np.ascontiguousarray(img)


def compressed_array(msg, topic: str = "") -> np.ndarray:
    """sensor_msgs/msg/CompressedImage (png, jpeg; compressed_depth_image_transport's 16-bit PNG) via Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise DataFormatError(f"topic {topic} holds CompressedImage messages: decoding them needs Pillow "
                              "(pip install 'mmcl-edge[images]')") from None
    data = bytes(_bytes(msg.data))
    if "compresseddepth" in msg.format.lower():
        if "16UC1" not in msg.format and "mono16" not in msg.format:
            raise DataFormatError(f"topic {topic}: compressed depth format {msg.format!r} is not supported "
                                  "(16UC1 / mono16 PNG is)")
        data = data[12:]                  # compressed_depth_image_transport's config header
    try:
        img = Image.open(io.BytesIO(data))
        arr = np.asarray(img.convert("RGB") if img.mode in ("P", "RGBA", "CMYK", "YCbCr", "LA") else img)
    except Exception as exc:  # Pillow raises many types for a broken image
        raise DataFormatError(f"topic {topic}: a CompressedImage ({msg.format!r}) cannot be decoded: {exc}") from None
    return arr.astype(np.uint16) if arr.dtype == np.int32 else arr


def _field_reader(paths: tuple[str, ...], topic: str) -> Callable:
    """``"fields": ["linear.x", "angular.z"]`` -> one float per field (sequences are flattened)."""
    def get(msg, path):
        v = msg
        for part in path.split("."):
            if not hasattr(v, part):
                raise DataFormatError(f"topic {topic}: {msgtype_of(msg)} has no field {path!r}")
            v = getattr(v, part)
        return v

    def convert(msg) -> np.ndarray:
        parts = []
        for p in paths:
            v = get(msg, p)
            try:
                parts.append(np.asarray(v, np.float32).reshape(-1))
            except (TypeError, ValueError):
                raise DataFormatError(f"topic {topic}: field {p!r} of {msgtype_of(msg)} is not numeric") from None
        return np.concatenate(parts)
    return convert


SERIES_CONVERTERS: dict[str, Callable[[TopicSource], Callable]] = {
    "sensor_msgs/msg/Imu": lambda s: _imu(s.orientation),
    "geometry_msgs/msg/Vector3Stamped": lambda s: lambda m: np.array(_vec3(m.vector), np.float32),
    "sensor_msgs/msg/JointState": lambda s: lambda m: np.asarray(m.position, np.float32),
    "std_msgs/msg/Float32MultiArray": lambda s: _multiarray,
    "std_msgs/msg/Float64MultiArray": lambda s: _multiarray,
}
HANDLED_TYPES = tuple(SERIES_CONVERTERS) + IMAGE_TYPES + ("std_msgs/msg/String",)


def converter(source: TopicSource, msgtype: str) -> Callable[[Any], Any]:
    """The function that turns one ``msgtype`` message of ``source.topic`` into its modality's value;
    a type that cannot feed the modality's kind is a DataFormatError naming topic, type and kind."""
    topic, kind = source.topic, source.kind
    if source.type and source.type != msgtype:
        raise DataFormatError(f"topic {topic} has type {msgtype}, but TOPICS.json expects {source.type}")
    if source.fields:
        if kind not in ("timeseries", "vector"):
            raise DataFormatError(f"topic {topic}: \"fields\" makes numbers, for a timeseries or vector, not a {kind}")
        return _field_reader(source.fields, topic)
    if msgtype in IMAGE_TYPES:
        if kind not in ("image", "video"):
            raise DataFormatError(f"topic {topic} has type {msgtype}: it can feed an image or video modality, "
                                  f"not a {kind}")
        decode = image_array if msgtype.endswith("/Image") else compressed_array
        return lambda m: decode(m, topic)
    if msgtype == "std_msgs/msg/String":
        if kind != "text":
            raise DataFormatError(f"topic {topic} has type {msgtype}: it can feed a text modality, not a {kind}")
        return lambda m: str(m.data)
    if msgtype in SERIES_CONVERTERS:
        if kind not in ("timeseries", "vector"):
            raise DataFormatError(f"topic {topic} has type {msgtype}: it can feed a timeseries or vector modality, "
                                  f"not a {kind}")
        return SERIES_CONVERTERS[msgtype](source)
    raise DataFormatError(f"topic {topic} has type {msgtype}, which has no built-in converter "
                          f"({', '.join(HANDLED_TYPES)}): name the numbers to read with \"fields\", "
                          'e.g. "fields": ["linear.x", "angular.z"]')
