"""Classifier heads: one that grows with new classes (class-IL), one over a fixed label set."""
from __future__ import annotations

import torch
from torch import nn


class GrowingHead(nn.Module):
    """A linear head made of one block per task; a new task appends rows for its new classes.

    Output ``i`` is the ``i``-th class in order of arrival (the pack manifest names them), so no
    task id is needed at test time.
    """

    def __init__(self, width: int, blocks: list[int] | None = None):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(nn.Linear(width, n) for n in (blocks or []))

    @property
    def num_outputs(self) -> int:
        return sum(b.out_features for b in self.blocks)

    def block_sizes(self) -> list[int]:
        return [b.out_features for b in self.blocks]

    def grow(self, n_new: int) -> None:
        if n_new > 0:
            self.blocks.append(nn.Linear(self.width, n_new))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(z) for b in self.blocks], dim=-1)


class FixedHead(GrowingHead):
    """Domain-IL: one block over the whole label set, created once."""

    def __init__(self, width: int, n_classes: int):
        super().__init__(width, [n_classes])

    def grow(self, n_new: int) -> None:  # the label set never changes across domains
        return None
