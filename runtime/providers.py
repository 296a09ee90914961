"""Execution providers: the best one onnxruntime offers here (TensorRT > CUDA > CPU), or the user's."""
from __future__ import annotations

import os

import functools

import onnxruntime as ort

from mmcl_edge.runtime.errors import RuntimeUserError
from mmcl_edge.threads import serve_threads

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SHORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
               "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def available() -> list[str]:
    return list(ort.get_available_providers())


@functools.lru_cache(maxsize=1)
def tensorrt_libraries() -> bool:
    """Whether TensorRT's runtime library (libnvinfer) can be loaded in this process (asked once)."""
    import ctypes
    import ctypes.util

    for name in ("libnvinfer.so.10", "libnvinfer.so", ctypes.util.find_library("nvinfer")):
        if not name:
            continue
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def choose(requested: list[str] | str | None = None) -> list[str]:
    """Providers to pass to a session, best first, always ending in CPU as the fallback.

    ``requested`` may use short names (``"cuda"``, ``"cpu"``, ``"tensorrt"``) or onnxruntime's own.
    """
    have = available()
    if requested is None:
        # onnxruntime-gpu lists TensorRT whether or not TensorRT's own library is installed; without
        # it every session fails once, logs an error and retries on CUDA. Prefer it only when it loads.
        chosen = [p for p in PREFERENCE if p in have and (p != "TensorrtExecutionProvider" or tensorrt_libraries())]
    else:
        items = [requested] if isinstance(requested, str) else list(requested)
        chosen = []
        for item in items:
            name = SHORT_NAMES.get(item.lower(), item)
            if name not in have:
                raise RuntimeUserError(f"execution provider {item!r} is not available in this onnxruntime "
                                       f"build; available: {', '.join(have)}")
            chosen.append(name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def spinning() -> bool:
    return os.environ.get("MMCL_EDGE_SERVE_SPIN", "0") == "1"


def session(path, providers: list[str], threads: int = 0, optimization: str = "all") -> ort.InferenceSession:
    """``optimization``: "all" (backbones: every fusion pays back at every request) or "basic"
    (packs: constant folding only; their fused graph runs as fast, and a swap builds the session
    a third faster: 5.5 vs 8.1 ms for an AV-Digits pack)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimization == "basic"
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    threads = serve_threads(threads)  # 0: $MMCL_EDGE_SERVE_THREADS, else onnxruntime's default (mmcl_edge/threads.py)
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # Idle onnxruntime threads spin-wait by default; on a small edge CPU they then steal the cores
    # that numpy preprocessing and the other session (backbone vs pack) need between runs.
    # A device whose cores serve nothing else can let them spin ($MMCL_EDGE_SERVE_SPIN=1): lower latency
    # at batch 1 on an idle CPU, at the price of cores busy between requests.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning() else "0")
    # bytes: a graph already read and checked (packs), so the file cannot change in between
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=opts, providers=providers)
