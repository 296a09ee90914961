"""Export of frozen backbones and learned adapter packs to ONNX (and TensorRT)."""
