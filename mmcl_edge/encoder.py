"""MMEncoder: cross-modality mixture-of-experts adapters beside frozen backbones (a side network).

At depth ``l`` every modality's tap ``l`` is projected into a common width and added to that
modality's running state; a router that sees all modalities picks top-k experts for each modality
and the chosen experts refine its state. The state is carried upward from depth to depth, so the
backbones run once and are never back-propagated through.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmcl_edge.backbones import TapSpec
from mmcl_edge.config import EncoderConfig
from mmcl_edge.experts import ExpertPool
from mmcl_edge.router import CrossModalRouter


def tap_for_depth(depth: int, depths: int, n_taps: int) -> int:
    """Which of a modality's taps feeds adapter depth ``depth`` (deepest tap at the last depth)."""
    if depths == 1:
        return n_taps - 1
    return round(depth * (n_taps - 1) / (depths - 1))


class TapProjection(nn.Module):
    """``[B, T, D]`` tokens -> ``[B, W]``: normalise each token, reduce it to ``rank`` features with
    one map shared by all tokens, flatten (keeps the token layout: time, space), project.

    ``rank`` 0 projects the flattened ``T * D`` tokens directly (packs before 0.3): on wide taps
    (1,280 channels x 4 tokens) that one matrix was most of a pack's bytes and of its run time.
    """

    def __init__(self, tap: TapSpec, width: int, rank: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(tap.dim)
        self.reduce = nn.Linear(tap.dim, rank, bias=False) if 0 < rank < tap.dim else None
        self.proj = nn.Linear(tap.tokens * (rank if self.reduce is not None else tap.dim), width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        if self.reduce is not None:
            x = self.reduce(x)
        return self.proj(x.flatten(1))


@dataclass
class EncoderOutput:
    per_modality: torch.Tensor   # [B, M, W] embeddings z_m
    fused: torch.Tensor          # [B, W] fused embedding z
    gates: list[torch.Tensor]    # per depth [B, M, E] (zero outside top-k)
    probs: list[torch.Tensor]    # per depth [B, M, E] full router softmax (for load balancing)


class MMEncoder(nn.Module):
    def __init__(self, modality_taps: dict[str, tuple[TapSpec, ...]], cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.modalities = list(modality_taps)
        self.modality_taps = {m: tuple(t) for m, t in modality_taps.items()}
        m_count, w = len(self.modalities), cfg.width
        self.proj = nn.ModuleList(
            nn.ModuleList(TapProjection(taps[tap_for_depth(l, cfg.depths, len(taps))], w, cfg.tap_rank)
                          for l in range(cfg.depths))
            for taps in self.modality_taps.values())
        self.routers = nn.ModuleList(
            CrossModalRouter(m_count, w, cfg.experts, cfg.top_k, cfg.cross_modal_routing) for _ in range(cfg.depths))
        self.pools = nn.ModuleList(ExpertPool(cfg.experts, w, cfg.bottleneck) for _ in range(cfg.depths))
        self.expert_norm = nn.ModuleList(nn.LayerNorm(w) for _ in range(cfg.depths))
        self.out_norm = nn.ModuleList(nn.LayerNorm(w) for _ in range(m_count))
        self.drop = nn.Dropout(cfg.dropout)

    def input_names(self) -> list[str]:
        """Flat, ordered tap input names: ``<modality>__<tap>`` for every tap of every modality."""
        return [f"{m}__{t.name}" for m in self.modalities for t in self.modality_taps[m]]

    def forward(self, taps: dict[str, list[torch.Tensor]], present: torch.Tensor | None = None) -> EncoderOutput:
        """``present`` ([B, M], 1 = the modality is there) lets a sample miss modalities: an absent
        modality adds nothing to its state and is left out of the fused embedding."""
        states = None
        gates, probs = [], []
        mask = None if present is None else present.to(next(iter(taps.values()))[0].dtype).unsqueeze(-1)  # [B, M, 1]
        for l in range(self.cfg.depths):
            inputs = []
            for i, m in enumerate(self.modalities):
                m_taps = taps[m]
                inputs.append(self.proj[i][l](m_taps[tap_for_depth(l, self.cfg.depths, len(m_taps))]))
            u = self.drop(torch.stack(inputs, dim=1))               # [B, M, W]
            if mask is not None:
                u = u * mask
            states = u if states is None else states + u
            g, p = self.routers[l](states)                          # [B, M, E]
            states = states + self.pools[l].mix(self.expert_norm[l](states), g)
            gates.append(g)
            probs.append(p)
        z = torch.stack([norm(states[:, i]) for i, norm in enumerate(self.out_norm)], dim=1)
        if mask is None:
            return EncoderOutput(z, z.mean(dim=1), gates, probs)
        fused = (z * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return EncoderOutput(z, fused, gates, probs)

    def frozen_experts(self) -> list[list[int]]:
        return [[int(i) for i in pool.frozen.nonzero().flatten()] for pool in self.pools]

    def apply_freezing(self) -> None:
        for pool in self.pools:
            pool.apply_freezing()
