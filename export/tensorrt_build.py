"""Optional TensorRT engine build from an exported backbone ONNX (FP16 where the GPU supports it)."""
from __future__ import annotations

from pathlib import Path

from mmcl_edge.runtime.tensorrt_backend import tensorrt_available


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot be used here; the message says why (the ONNX path keeps working)."""


def build_engine(onnx_path: Path, engine_path: Path, input_shape: list[int], fp16: bool = True,
                 batch_sizes: tuple[int, int, int] = (1, 8, 64), workspace_mb: int = 1024) -> dict:
    """Build a serialized engine with one optimisation profile (min/opt/max batch)."""
    ok, why = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(f"TensorRT engine not built: {why}; the ONNX backbones are used instead")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTUnavailable(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    use_fp16 = fp16 and builder.platform_has_fast_fp16
    if use_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    lo, opt, hi = batch_sizes
    profile.set_shape("x", [lo, *input_shape], [opt, *input_shape], [hi, *input_shape])
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise TensorRTUnavailable(f"TensorRT failed to build an engine from {onnx_path}")
    Path(engine_path).write_bytes(bytes(engine))
    return {"file": Path(engine_path).name, "fp16": bool(use_fp16), "batch_sizes": list(batch_sizes),
            "tensorrt": trt.__version__}


def build_engines(folder: Path, fp16: bool = True, log=print) -> dict:
    """Build an engine per exported backbone and record it in ``backbones.json``."""
    from mmcl_edge.export.backbone_export import read_index, write_index

    folder = Path(folder)
    index = read_index(folder)
    for m, e in index["modalities"].items():
        log(f"building a TensorRT engine for the {m} backbone ...")
        e["tensorrt"] = build_engine(folder / e["file"], folder / f"{m}.engine", e["input_shape"], fp16)
    write_index(folder, index)
    return index
