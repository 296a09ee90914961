"""Errors the runtime reports in plain words (the CLI prints them without a traceback).

The classes live in ``mmcl_edge.errors`` (one hierarchy for the whole package, torch-free).
"""
from mmcl_edge.errors import InputError, MMCLError, PackRejected, RuntimeUserError

__all__ = ["MMCLError", "RuntimeUserError", "PackRejected", "InputError"]
