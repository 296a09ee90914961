"""Latency of the runtime as a robotics pipeline sees it: per-stage percentiles, throughput, swap time.

Torch-free, so it runs on the inference-only device itself. (``mmcl-edge bench latency`` adds the
PyTorch-eager comparison where PyTorch is installed.)
"""
from __future__ import annotations

import time

import numpy as np

from mmcl_edge.runtime.errors import RuntimeUserError
from mmcl_edge.runtime.service import Runtime


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def measure_predict(rt: Runtime, inputs: dict, repeats: int = 50, warmup: int = 5) -> dict:
    """Per-stage latency (ms) of ``rt.predict(inputs)`` over ``repeats`` calls."""
    for _ in range(warmup):
        rt.predict(inputs)
    stages: dict[str, list[float]] = {}
    start = time.perf_counter()
    for _ in range(repeats):
        for k, v in rt.predict(inputs).timings_ms.items():
            stages.setdefault(k, []).append(v)
    wall = time.perf_counter() - start
    batch = len(rt.predict(inputs).labels)
    return {"batch": batch, "stages_ms": {k: percentiles(v) for k, v in stages.items()},
            "throughput_samples_per_s": batch * repeats / wall}


def measure_swap(rt: Runtime, packs: list, repeats: int = 5) -> dict:
    """Time to validate + warm + swap in a pack (the serving path is never blocked meanwhile)."""
    ms = []
    for i in range(repeats):
        t0 = time.perf_counter()
        rt.swap(packs[i % len(packs)])
        ms.append(1e3 * (time.perf_counter() - t0))
    return percentiles(ms)


def example_inputs(rt: Runtime, batch: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Random raw samples of the shapes each modality takes (for timing where no test data is at hand)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for m, e in rt.backbones.index.items():
        spec = rt.backbones.specs[m]
        if spec.kind == "vector":
            shape = tuple(e["input_shape"])
        elif spec.kind == "image":
            shape = (spec.image_size, spec.image_size)
        elif spec.kind == "audio":
            shape = (int(spec.sample_rate * spec.clip_seconds),)
        elif spec.kind == "timeseries":
            shape = (spec.series_length, 3)
        else:
            raise RuntimeUserError(f"no example input for modality kind {spec.kind!r}")
        inputs[m] = [rng.random(shape, dtype=np.float32) for _ in range(batch)]
    return inputs
