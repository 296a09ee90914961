"""Freezing of influential experts: after a task, the experts the router relied on most for that
task are frozen, so later tasks can still route through them but cannot overwrite them."""
from __future__ import annotations

import torch

from mmcl_edge.config import FreezeConfig


class RoutingStats:
    """Accumulates, per depth and expert, routing mass (sum of gates) and activation counts."""

    def __init__(self, depths: int, experts: int):
        self.mass = torch.zeros(depths, experts)
        self.count = torch.zeros(depths, experts)
        self.routed = 0

    @torch.no_grad()
    def update(self, gates: list[torch.Tensor]) -> None:
        for l, g in enumerate(gates):
            flat = g.detach().flatten(0, 1)  # [B*M, E]
            self.mass[l] += flat.sum(0).cpu()
            self.count[l] += (flat > 0).float().sum(0).cpu()
        self.routed += gates[0].shape[0] * gates[0].shape[1]

    def influence(self, mass_weight: float) -> torch.Tensor:
        """``[depths, experts]``: weighted share of routing mass and of activations."""
        mass = self.mass / self.mass.sum(1, keepdim=True).clamp_min(1e-12)
        freq = self.count / self.count.sum(1, keepdim=True).clamp_min(1e-12)
        return mass_weight * mass + (1 - mass_weight) * freq


def choose_experts_to_freeze(influence: torch.Tensor, frozen: list[list[int]], cfg: FreezeConfig) -> list[list[int]]:
    """Per depth, the most influential experts not yet frozen, keeping ``min_plastic`` trainable."""
    chosen = []
    for l in range(influence.shape[0]):
        already = set(frozen[l])
        plastic = [e for e in range(influence.shape[1]) if e not in already]
        budget = max(0, min(cfg.per_task, len(plastic) - cfg.min_plastic))
        ranked = sorted(plastic, key=lambda e: -float(influence[l, e]))
        chosen.append([e for e in ranked[:budget] if influence[l, e] > 0])
    return chosen
