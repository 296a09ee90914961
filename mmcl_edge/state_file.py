"""The learner's state file: safetensors, written tensor by tensor.

``safetensors.torch.save`` builds the whole file in memory, after the model's state has
made a float32 copy of the ridge head's float64 sums (as ``save_state`` did): on AV-Digits that was +80 MB at every task's
save, the learner's highest point once the ridge solve stopped copying. Here each tensor goes
straight to the file, the float64 ones converted a block of rows at a time. The file is plain
safetensors (``safetensors.torch.load_file`` reads it; tests hold them equal).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mmcl_edge.runtime import layout

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
           torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_ROWS = 256  # rows per conversion block: a [256, d] float32 temporary, not a [d, d] one


def _stored_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype == torch.float64 else t.dtype   # float64 sums are stored as float32


def _write_tensor(f, t: torch.Tensor) -> None:
    t = t.detach()
    if t.dtype != torch.float64:
        f.write(t.contiguous().numpy().tobytes())
        return
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    for i in range(0, rows.shape[0], _ROWS):
        f.write(rows[i:i + _ROWS].to(torch.float32).contiguous().numpy().tobytes())


def write_state(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (float64 ones as float32) to ``path`` atomically, as safetensors."""
    header, offset = {}, 0
    for name, t in tensors.items():
        dtype = _stored_dtype(t)
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: tensors of {dtype} are not stored in a state file")
        size = t.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # the data starts 8-byte aligned, as safetensors writes it

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for t in tensors.values():
                _write_tensor(f, t)

    layout.atomic_write(Path(path), write)
