"""A TensorRT engine backend for backbones (used when an engine exists and ``tensorrt`` imports).

Device memory is handled with NVIDIA's ``cuda-python`` bindings (``cuda.bindings.runtime`` or the
older ``cuda.cudart``), never torch. Without them, or without a GPU, the runtime falls back to
onnxruntime, whose TensorRT/CUDA providers cover the same hardware.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def tensorrt_available() -> tuple[bool, str]:
    """(usable, reason): tensorrt and cuda-python import and a CUDA device is present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt Python package is not installed"
    try:
        cudart = _cudart()
    except ImportError:
        return False, "cuda-python (cuda.bindings) is not installed"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return False, "no CUDA device is visible"
    return True, "ok"


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTEngine:
    """Runs a serialized engine with input ``x`` and the tap outputs; one execution at a time."""

    def __init__(self, engine_path: Path, outputs: list[str]):
        import tensorrt as trt

        self.trt, self.cudart, self.outputs = trt, _cudart(), outputs
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path} is not a TensorRT engine for this TensorRT version/GPU")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        cudart, trt = self.cudart, self.trt
        x = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            self.context.set_input_shape("x", x.shape)
            buffers, results = [], []
            try:
                d_in = _check(cudart.cudaMalloc(x.nbytes))
                buffers.append(d_in)
                _check(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                self.context.set_tensor_address("x", d_in)
                for name in self.outputs:
                    shape = tuple(self.context.get_tensor_shape(name))
                    dtype = trt.nptype(self.engine.get_tensor_dtype(name))
                    host = np.empty(shape, dtype=dtype)
                    dev = _check(cudart.cudaMalloc(host.nbytes))
                    buffers.append(dev)
                    self.context.set_tensor_address(name, dev)
                    results.append((host, dev))
                if not self.context.execute_async_v3(self.stream):
                    raise RuntimeError("TensorRT execution failed")
                for host, dev in results:
                    _check(cudart.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes,
                                                  cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
                _check(cudart.cudaStreamSynchronize(self.stream))
            finally:
                for b in buffers:
                    cudart.cudaFree(b)
        return [h.astype(np.float32) for h, _ in results]
