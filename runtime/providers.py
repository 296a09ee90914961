"""Execution providers: the best one onnxruntime offers here (TensorRT > CUDA > CPU), or the user's."""
from __future__ import annotations


import functools

import onnxruntime as ort

from mmcl_edge.runtime.errors import RuntimeUserError
from mmcl_edge.threads import env_choice, serve_threads

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


SPIN_ENV = "MMCL_EDGE_SERVE_SPIN"
SPIN_POLICIES = {"never": "never", "0": "never", "run": "run", "always": "always", "1": "always"}


def spin_policy() -> str:
    """How idle onnxruntime threads wait ($MMCL_EDGE_SERVE_SPIN): "never" (or 0, the default): sleep
    at once, even between the operators of one run; "run": spin while a run is going and sleep as
    soon as it returns; "always" (or 1): onnxruntime's default, spin between runs too."""
    return env_choice(SPIN_ENV, SPIN_POLICIES, "never")


# Of onnxruntime's basic rewrites a pack needs constant folding (its float16 or int8 weights become
# float32 once, at load); these two search the whole graph for repeats our exporter never writes
# and cost 0.7-0.8 ms of each swap (AV-Digits 5.66 -> 4.99 ms, UTD-MHAD 6.7 -> 5.9 ms to build the
# session; outputs bit for bit the same, run time the same).
PACK_SKIPPED_OPTIMIZERS = ["CommonSubexpressionElimination", "ConstantSharing"]


def session(path, providers: list[str], threads: int = 0, optimization: str = "all") -> ort.InferenceSession:
    """``optimization``: "all" (backbones: every fusion pays back at every request) or "basic"
    (packs: constant folding and the cheap rewrites; their fused graph runs as fast, and a swap
    builds the session far faster: 5.0 vs 8.1 ms for an AV-Digits pack)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimization == "basic"
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    threads = serve_threads(threads)  # 0: $MMCL_EDGE_SERVE_THREADS, else onnxruntime's default (mmcl_edge/threads.py)
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # Idle onnxruntime threads spin-wait by default, also between runs; on a small edge CPU they then
    # steal the cores that numpy preprocessing, the next session (backbone, pack) and a learner need.
    # Threads that sleep at once pay a wake-up at every operator instead (UTD-MHAD, 2 cores, batch 1:
    # 7.8 ms end to end vs 6.6 with "run"), but a spinning thread that a learner preempts holds up
    # the whole run (p99 beside a learner: 11.2 vs 29.0 ms), so sleeping stays the default.
    policy = spin_policy()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if policy == "never" else "1")
    if policy == "run":
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    # bytes: a graph already read and checked (packs), so the file cannot change in between
    skipped = {"disabled_optimizers": PACK_SKIPPED_OPTIMIZERS} if optimization == "basic" else {}
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=opts, providers=providers,
                                **skipped)
