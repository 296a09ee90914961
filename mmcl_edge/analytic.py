"""A closed-form streaming ridge head (RanPAC/ACIL-style), an optional improvement to the paper.

A linear head trained by gradient on task data alone is biased towards the newest classes when no
old samples are kept. This head instead keeps running sums — the Gram matrix ``G = sum f f^T`` and
class sums ``C = sum f y^T`` of features — and solves ``W = (G + lam I)^-1 C`` after each task.
The sums are order-invariant: over fixed features the result after the last task equals a
ridge head trained jointly on all tasks, with no sample stored.
"""
from __future__ import annotations

import torch
from torch import nn


class StreamingRidgeHead(nn.Module):
    def __init__(self, dim: int, n_classes: int, ridge: float = 1e-2):
        super().__init__()
        self.ridge = ridge
        self.register_buffer("gram", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("class_sums", torch.zeros(dim, n_classes, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(dim, n_classes))
        self.register_buffer("mean", torch.zeros(dim))

    @torch.no_grad()
    def update(self, feats: torch.Tensor, y: torch.Tensor) -> None:
        f = feats.double()
        self.gram += f.T @ f
        self.class_sums.index_add_(1, y, f.T)

    @torch.no_grad()
    def solve(self) -> None:
        d = self.gram.shape[0]
        lam = self.ridge * torch.trace(self.gram) / d
        w = torch.linalg.solve(self.gram + lam * torch.eye(d, dtype=self.gram.dtype), self.class_sums)
        self.weight.copy_(w.float())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight
