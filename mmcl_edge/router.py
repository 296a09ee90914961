"""The cross-modality router: it sees every modality's state and picks top-k experts for each."""
from __future__ import annotations

import torch
from torch import nn


class CrossModalRouter(nn.Module):
    """Logits ``[B, M, E]`` from all modalities' states; gates are a softmax over the top-k.

    With ``cross_modal=False`` each modality is routed on its own state only (an ablation).
    """

    def __init__(self, n_modalities: int, width: int, n_experts: int, top_k: int, cross_modal: bool = True):
        super().__init__()
        self.m, self.e, self.k, self.cross_modal = n_modalities, n_experts, min(top_k, n_experts), cross_modal
        self.norm = nn.LayerNorm(width)
        in_dim = n_modalities * width if cross_modal else width
        self.proj = nn.ModuleList(nn.Linear(in_dim, n_experts) for _ in range(n_modalities))
        for p in self.proj:
            nn.init.normal_(p.weight, std=0.02)
            nn.init.zeros_(p.bias)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``states [B, M, W]`` -> (dense gates ``[B, M, E]`` zero outside top-k, router probs)."""
        h = self.norm(states)
        if self.cross_modal:  # every modality's router reads all states: one product for all of them
            w = torch.cat([p.weight for p in self.proj], dim=0)          # [M*E, M*W]
            b = torch.cat([p.bias for p in self.proj], dim=0)
            logits = torch.nn.functional.linear(h.flatten(1), w, b).unflatten(-1, (self.m, self.e))
        else:
            logits = torch.stack([p(h[:, i]) for i, p in enumerate(self.proj)], dim=1)
        kth = logits.topk(self.k, dim=-1).values[..., -1:]
        # a softmax over the top-k logits, zero elsewhere: a mask rather than a scatter of indices, so
        # the graph has no index arithmetic that an exporter could bake the batch size into
        gates = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        return gates, torch.softmax(logits, dim=-1)
