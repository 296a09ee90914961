"""GPU paths: onnxruntime's CUDA provider and TensorRT engines. They skip, with the reason, where the
hardware or the library is missing (always in CI); on a GPU machine they check parity with the CPU."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from mmcl_edge.runtime import Runtime
from mmcl_edge.runtime import providers as prov
from mmcl_edge.runtime.tensorrt_backend import tensorrt_available

needs_cuda = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="onnxruntime has no CUDAExecutionProvider here (needs onnxruntime-gpu and a GPU)")
TRT_OK, TRT_WHY = tensorrt_available()
needs_tensorrt = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT unavailable: {TRT_WHY}")


def test_provider_choice_prefers_gpu_and_ends_in_cpu():
    chosen = prov.choose()
    assert chosen[-1] == "CPUExecutionProvider"
    have = ort.get_available_providers()
    order = [p for p in prov.PREFERENCE if p in have
             and (p != "TensorrtExecutionProvider" or prov.tensorrt_libraries())]
    assert chosen == order  # TensorRT only where its library loads (onnxruntime-gpu lists it regardless)
    assert prov.choose("cpu") == ["CPUExecutionProvider"]


def test_unavailable_provider_is_a_plain_error():
    from mmcl_edge.runtime.errors import RuntimeUserError

    missing = next((p for p in ("tensorrt", "cuda") if prov.SHORT_NAMES[p] not in ort.get_available_providers()), None)
    if missing is None:
        pytest.skip("every provider is available here")
    with pytest.raises(RuntimeUserError, match="not available"):
        prov.choose(missing)


def _inputs(ws, n=16):
    sc = ws.scenario()
    return {m: sc.test.samples[m][:n] for m in sc.specs}


@pytest.mark.gpu
@needs_cuda
def test_cuda_provider_matches_cpu(avdigits_ws):
    cpu = Runtime(avdigits_ws.root, providers="cpu").predict(_inputs(avdigits_ws))
    rt = Runtime(avdigits_ws.root, providers="cuda")
    assert rt.backbones.backends[next(iter(rt.backbones.backends))].endswith("CUDAExecutionProvider")
    gpu = rt.predict(_inputs(avdigits_ws))
    # onnxruntime's CUDA provider computes convolutions in TF32 on Ampere and later: on an H200 the
    # probabilities moved by up to 0.012 (AV-Digits, 32 samples) while every label stayed the same
    np.testing.assert_allclose(gpu.probabilities, cpu.probabilities, atol=3e-2)
    assert np.mean(np.array(gpu.labels) == np.array(cpu.labels)) >= 0.98


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_engine_backend_matches_cpu(avdigits_ws, tmp_path):
    import shutil

    from mmcl_edge.export.tensorrt_build import build_engines

    ws = tmp_path / "ws"
    shutil.copytree(avdigits_ws.root, ws, ignore=shutil.ignore_patterns("taps"))
    build_engines(ws / "backbones", fp16=True, log=lambda *_: None)
    cpu = Runtime(ws, providers="cpu", use_tensorrt_engine=False).predict(_inputs(avdigits_ws, 64))
    rt = Runtime(ws, providers="cpu")
    assert set(rt.backbones.backends.values()) == {"tensorrt-engine"}
    trt = rt.predict(_inputs(avdigits_ws, 64))
    assert np.mean(np.array(trt.labels) == np.array(cpu.labels)) >= 0.95  # FP16 engine vs fp32 CPU


def test_tensorrt_build_without_tensorrt_is_a_clear_message(synthetic_ws, tmp_path):
    if TRT_OK:
        pytest.skip("TensorRT is available here; the message path is for machines without it")
    from mmcl_edge.export.tensorrt_build import TensorRTUnavailable, build_engine

    with pytest.raises(TensorRTUnavailable, match="TensorRT engine not built"):
        build_engine(synthetic_ws.root / "backbones" / "m0.onnx", tmp_path / "m0.engine", [12])
