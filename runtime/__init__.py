"""Torch-free runtime: numpy + onnxruntime, hot-swappable adapter packs."""
