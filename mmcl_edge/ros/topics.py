"""TOPICS.json: which topic feeds which modality, and how its messages become arrays.

    {"imu":   {"topic": "/watch/imu", "kind": "timeseries"},
     "depth": {"topic": "/camera/depth/image_raw", "kind": "video", "frames": 16},
     "twist": {"topic": "/cmd_vel", "kind": "timeseries", "fields": ["linear.x", "angular.z"]}}

Bag-side keys (``topic``, ``fields``, ``time``, ``steps``, ``orientation``, ``type``) say how to read
the topic; every other key is a preprocessing option that goes on into the task folder's
``modalities.json`` as it is (``frames``, ``image_size``, ``encoding``, ...).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcl_edge.errors import DataFormatError
from mmcl_edge.preprocess import KINDS, PreprocessSpec

BAG_KEYS = ("topic", "kind", "fields", "time", "steps", "orientation", "type")
TIME_SOURCES = ("header", "receive")
# Kinds a bag can feed: audio needs a waveform topic type that no common ROS message carries.
BAG_KINDS = tuple(k for k in KINDS if k != "audio") + (("text",) if "text" in KINDS else ())
MODALITY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True)
class TopicSource:
    """One modality read from one topic."""

    modality: str
    topic: str
    kind: str
    time: str = "header"                 # header stamp where the message has one, else receive time
    fields: tuple[str, ...] = ()         # dotted message fields, for types without a built-in converter
    steps: int | None = None             # timeseries: fixed steps per window (else from the rate)
    orientation: bool = False            # sensor_msgs/msg/Imu: add the orientation quaternion (4 channels)
    type: str | None = None              # expected message type, checked against the bag
    preprocess: dict[str, Any] = field(default_factory=dict)   # options for modalities.json

    @property
    def frames(self) -> int:
        """Frames per video window: the same number the video preprocessing keeps."""
        return int(self.preprocess.get("frames", PreprocessSpec.frames))


def load_topics(source) -> dict[str, TopicSource]:
    """TOPICS.json (a path, or the parsed dict) -> ``{modality: TopicSource}``; any mistake is a
    DataFormatError naming the modality and key."""
    where = "TOPICS.json"
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            raw = json.loads(Path(source).read_text())
        except OSError as exc:
            raise DataFormatError(f"cannot read {where}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{where} is not valid JSON: {exc}") from None
    else:
        raw = source
    if not isinstance(raw, dict) or not raw:
        raise DataFormatError(f'{where} must map modality names to topics, e.g. '
                              '{"imu": {"topic": "/imu", "kind": "timeseries"}}')
    out: dict[str, TopicSource] = {}
    for name, opts in raw.items():
        if not isinstance(name, str) or not MODALITY_NAME.match(name) or "__" in name:
            raise DataFormatError(f"{where}: modality name {name!r} must be a plain identifier (letters, digits, "
                                  "single underscores, starting with a letter)")
        if not isinstance(opts, dict):
            raise DataFormatError(f"{where}: {name!r} must be an object with at least \"topic\" and \"kind\"")
        topic, kind = opts.get("topic"), opts.get("kind")
        if not isinstance(topic, str) or not topic.startswith("/"):
            raise DataFormatError(f"{where}: {name!r} needs \"topic\": a topic name starting with '/'")
        if kind not in BAG_KINDS:
            raise DataFormatError(f"{where}: {name!r} has kind {kind!r}; a bag topic can feed {', '.join(BAG_KINDS)}")
        time = opts.get("time", "header")
        if time not in TIME_SOURCES:
            raise DataFormatError(f"{where}: {name!r} \"time\" must be \"header\" or \"receive\", not {time!r}")
        fields = opts.get("fields", [])
        if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
            raise DataFormatError(f"{where}: {name!r} \"fields\" must be a list of message field names, "
                                  'e.g. ["linear.x", "angular.z"]')
        steps = opts.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 100_000):
            raise DataFormatError(f"{where}: {name!r} \"steps\" must be an integer from 2 to 100000, not {steps!r}")
        if steps is not None and kind != "timeseries":
            raise DataFormatError(f"{where}: {name!r} \"steps\" is for timeseries; a {kind} uses \"frames\" or one frame")
        orientation = opts.get("orientation", False)
        if not isinstance(orientation, bool):
            raise DataFormatError(f"{where}: {name!r} \"orientation\" must be true or false")
        msgtype = opts.get("type")
        if msgtype is not None and not isinstance(msgtype, str):
            raise DataFormatError(f"{where}: {name!r} \"type\" must be a message type such as sensor_msgs/msg/Imu")
        preprocess = {k: v for k, v in opts.items() if k not in BAG_KEYS}
        known = set(PreprocessSpec.__dataclass_fields__) - {"kind", "options"}
        unknown = sorted(set(preprocess) - known)
        if unknown:
            raise DataFormatError(f"{where}: {name!r} has unknown keys {unknown}; bag keys are "
                                  f"{', '.join(BAG_KEYS)}, preprocessing keys {', '.join(sorted(known))}")
        if kind in KINDS:
            try:
                PreprocessSpec(kind=kind, **preprocess)
            except (TypeError, ValueError) as exc:
                raise DataFormatError(f"{where}: {name!r}: {exc}") from None
            frames = preprocess.get("frames", 1)
            if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
                raise DataFormatError(f"{where}: {name!r} \"frames\" must be a positive integer, not {frames!r}")
        out[name] = TopicSource(name, topic, kind, time, tuple(fields), steps, orientation, msgtype, preprocess)
    return out
