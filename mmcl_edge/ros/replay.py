"""Replay a bag through the runtime: a sliding window over the recording, one answer per window,
optionally written back as a new bag beside the sensors (``/mmcl/prediction``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from mmcl_edge.errors import DataFormatError
from mmcl_edge.ros.bag import Bag, new_bag
from mmcl_edge.ros.topics import load_topics
from mmcl_edge.ros.window import SensorWindow, Window

PREDICTION_TOPIC = "/mmcl/prediction"


def check_against_runtime(sources: dict, runtime) -> None:
    """TOPICS.json must name the workspace's modalities with their kinds."""
    specs = runtime.backbones.specs
    for m, s in sources.items():
        if m not in specs:
            raise DataFormatError(f"TOPICS.json names modality {m!r}; the workspace has {', '.join(specs)}")
        if specs[m].kind != s.kind:
            raise DataFormatError(f"TOPICS.json says {m!r} is a {s.kind}; the workspace learned it as a {specs[m].kind}")


def answer(runtime, w: Window) -> dict:
    """One window's answer: the JSON object ``predict --bag --json`` prints and ``/mmcl/prediction`` carries."""
    p = runtime.predict({m: [v] for m, v in w.sample.items()})
    score = float(p.scores[0])
    doc = {"start": round(w.start, 6), "end": round(w.end, 6), "label": p.labels[0],
           "score": score if np.isfinite(score) else None, "modalities": list(p.modalities),
           "pack_version": int(p.pack_version)}
    for extra in ("unknown", "novelty"):              # where the runtime's Prediction has them
        v = getattr(p, extra, None)
        if v is not None:
            v = v[0] if isinstance(v, (list, tuple, np.ndarray)) else v
            v = v.item() if isinstance(v, np.generic) else v
            doc[extra] = None if isinstance(v, float) and not np.isfinite(v) else v
    return doc


def replay(runtime, bag, topics_json, window: float, hop: float, out=None, lateness: float = 0.25) -> Iterator[dict]:
    """Yield one answer per window (``window`` seconds every ``hop``, from the bag's first message)
    that has at least one modality. With ``out``, also write a new rosbag2 (MCAP) folder holding
    every topic of the bag plus ``/mmcl/prediction`` (std_msgs/msg/String, the answer as JSON,
    stamped at the window's end); it appears at ``out`` only once complete."""
    sources = load_topics(topics_json)
    check_against_runtime(sources, runtime)
    if not (window > 0 and hop > 0):
        raise DataFormatError(f"--window and --hop must be positive seconds, not {window} and {hop}")
    with Bag(bag) as b:
        b.check_topics([s.topic for s in sources.values()])
        if b.duration < window:
            raise DataFormatError(f"the bag {b.path} lasts {b.duration:.3f} s, less than one window ({window} s)")
        sw = SensorWindow(sources, window=window, hop=hop, steps=b.series_steps(sources, window), lateness=lateness,
                          origin_ns=b.start_ns)
        wanted = {s.topic for s in sources.values()}
        if out is None:
            for topic, ns, msg in b.messages(sorted(wanted)):
                for w in sw.push(topic, ns, msg):
                    yield answer(runtime, w)
            for w in sw.flush():
                yield answer(runtime, w)
            return
        yield from _replay_into(runtime, b, sw, wanted, Path(out))


def _replay_into(runtime, b: Bag, sw: SensorWindow, wanted: set, out: Path) -> Iterator[dict]:
    from rosbags.interfaces import MessageDefinitionFormat
    from rosbags.typesys import Stores, get_typestore

    ros2 = get_typestore(Stores.ROS2_HUMBLE)
    String = ros2.types["std_msgs/msg/String"]
    reader = b.reader
    if not reader.is2:                  # ROS 1 messages become ROS 2 ones, as rosbags' own converter does it
        from rosbags.convert.converter import migrate_bytes

        ros2.register({k: v for k, v in reader.typestore.fielddefs.items() if k not in ros2.fielddefs})
        cache: dict = {}

        def to_cdr(raw, msgtype):
            return migrate_bytes(reader.typestore, ros2, msgtype, msgtype, cache, raw, src_is2=False, dst_is2=True)
    with new_bag(out) as writer:
        by_topic = {}
        for c in reader.connections:
            if c.topic in by_topic:
                continue
            if reader.is2 and c.msgdef.format != MessageDefinitionFormat.NONE and c.digest:
                by_topic[c.topic] = writer.add_connection(c.topic, c.msgtype, msgdef=c.msgdef.data, rihs01=c.digest)
            else:                                     # ROS 1, or no definitions: ROS 2 definitions from the types
                by_topic[c.topic] = writer.add_connection(c.topic, c.msgtype, typestore=ros2 if not reader.is2
                                                          else reader.typestore)
        pred = writer.add_connection(PREDICTION_TOPIC, "std_msgs/msg/String", typestore=ros2)

        def emit(windows):
            for w in windows:
                doc = answer(runtime, w)
                data = ros2.serialize_cdr(String(data=json.dumps(doc, allow_nan=False)), "std_msgs/msg/String")
                writer.write(pred, b.start_ns + int(round(w.end * 1e9)), data)
                yield doc

        for conn, ns, raw in b.raw():
            cdr = raw if reader.is2 else to_cdr(raw, conn.msgtype)
            writer.write(by_topic[conn.topic], ns, cdr)
            if conn.topic in wanted:
                msg = reader.deserialize(raw, conn.msgtype)
                yield from emit(sw.push(conn.topic, ns, msg))
        yield from emit(sw.flush())
