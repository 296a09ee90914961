"""mmcl-edge: multi-modal continual learning on edge devices.

Kept import-light on purpose: ``import mmcl_edge.runtime`` must work in a process
without PyTorch, so nothing here imports torch.
"""

__version__ = "0.3.0"
