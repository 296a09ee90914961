"""Bottleneck-adapter experts, shared across tasks, each of which can be frozen on its own."""
from __future__ import annotations

import torch
from torch import nn


class BottleneckExpert(nn.Module):
    """``x -> up(gelu(down(x)))``; ``up`` starts at zero so a new expert begins as a no-op."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.nn.functional.gelu(self.down(x)))


class ExpertPool(nn.Module):
    """The experts of one depth; frozen experts stay usable but get no gradient."""

    def __init__(self, n: int, width: int, bottleneck: int):
        super().__init__()
        self.experts = nn.ModuleList(BottleneckExpert(width, bottleneck) for _ in range(n))
        self.register_buffer("frozen", torch.zeros(n, dtype=torch.bool))

    def freeze(self, index: int) -> None:
        self.frozen[index] = True
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """Re-apply ``requires_grad`` from the ``frozen`` buffer (after loading a state)."""
        for i, expert in enumerate(self.experts):
            frozen = bool(self.frozen[i])
            for p in expert.parameters():
                p.requires_grad_(not frozen)
                if frozen:
                    # A stale (zeroed) gradient would let an optimiser with momentum or weight
                    # decay keep moving the expert; without a gradient it is skipped.
                    p.grad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All experts on ``x [..., width]`` -> ``[..., n_experts, width]`` (dense)."""
        return torch.stack([e(x) for e in self.experts], dim=-2)

    def mix(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``sum_e gates[..., e] * expert_e(x)`` -> ``[..., width]``.

        The same sum as weighting ``forward``'s stack, computed as two matrix products over the
        experts' weights side by side (the gate scales each expert's hidden units before ``up``,
        which is linear): a pack runs 4 large operators per depth instead of ~60 small ones.
        A frozen expert's slice gets no gradient, as before.
        """
        n, hidden = len(self.experts), self.experts[0].down.out_features
        down_w = torch.cat([e.down.weight for e in self.experts], dim=0)       # [E*b, W]
        down_b = torch.cat([e.down.bias for e in self.experts], dim=0)         # [E*b]
        h = torch.nn.functional.gelu(torch.nn.functional.linear(x, down_w, down_b))
        h = (h.unflatten(-1, (n, hidden)) * gates.unsqueeze(-1)).flatten(-2)   # [..., E*b]
        up_w = torch.cat([e.up.weight for e in self.experts], dim=1)           # [W, E*b]
        up_b = torch.stack([e.up.bias for e in self.experts], dim=0)           # [E, W]
        return torch.nn.functional.linear(h, up_w) + gates @ up_b
