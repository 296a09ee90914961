"""Torch-free runtime: numpy + onnxruntime (+ tensorrt if present), hot-swappable adapter packs.

    from mmcl_edge.runtime import Runtime
    rt = Runtime("my-workspace")          # backbones once, the current pack
    rt.start_watcher()                    # follow new packs as tasks are learned
    rt.predict({"audio": wave, "image": img}).labels
"""
from mmcl_edge.runtime.errors import InputError, PackRejected, RuntimeUserError
from mmcl_edge.runtime.service import Prediction, Runtime

__all__ = ["Runtime", "Prediction", "RuntimeUserError", "PackRejected", "InputError"]
