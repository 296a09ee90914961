"""The learnable part (MMEncoder + head) as one module, saved as safetensors + JSON (no pickle)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mmcl_edge.analytic import StreamingRidgeHead, pooled_tap_features
from mmcl_edge.backbones import TapSpec
from mmcl_edge.config import EncoderConfig
from mmcl_edge.encoder import EncoderOutput, MMEncoder
from mmcl_edge.heads import FixedHead, GrowingHead
from mmcl_edge.novelty import NoveltyThreshold


class MMCLModel(nn.Module):
    def __init__(self, modality_taps: dict[str, tuple[TapSpec, ...]], cfg: EncoderConfig, setting: str,
                 n_classes: int = 0, head_blocks: list[int] | None = None, head_mode: str = "linear",
                 ridge: float = 1e-2, fused_weight: float = 2.0, novelty: dict | None = None):
        super().__init__()
        self.setting, self.head_mode, self.n_classes, self.ridge = setting, head_mode, n_classes, ridge
        # the fused embedding (LayerNorm'd, norm ~sqrt(width)) scaled to norm ~fused_weight, beside
        # frozen taps of norm 1 each: how much the ridge head leans on the adapted features
        self.fused_weight = fused_weight
        self.fused_scale = fused_weight / float(cfg.width) ** 0.5
        self.encoder = MMEncoder(modality_taps, cfg)
        if setting == "domain-il":
            self.head = FixedHead(cfg.width, n_classes)
        else:
            self.head = GrowingHead(cfg.width, head_blocks)
        if head_mode not in ("linear", "analytic"):
            raise ValueError(f"unknown head {head_mode!r}: use linear or analytic")
        self.analytic = StreamingRidgeHead(self.feature_dim(), n_classes, ridge) if head_mode == "analytic" else None
        # the threshold above which an answer is "unknown" (mmcl_edge/novelty.py); calibrated per task
        self.novelty = NoveltyThreshold(novelty.get("threshold", 0.0), novelty.get("calibration_samples", 0),
                                        novelty.get("calibrated_on", "training (leave-one-out)")) \
            if novelty else NoveltyThreshold()

    def grow_classes(self, n_seen: int) -> None:
        """Make room for ``n_seen`` classes: the linear head grows a block, the ridge head's sums a
        column per new class (a workspace taught task by task does not know its classes up front)."""
        self.head.grow(n_seen - self.head.num_outputs)
        if self.analytic is not None and n_seen > self.analytic.num_classes:
            self.analytic.grow(n_seen)
        self.n_classes = max(self.n_classes, n_seen)

    def fixed_feature_dim(self) -> int:
        """Frozen-backbone part of the analytic features (every tap, pooled) plus a constant 1."""
        return sum(t.dim for taps in self.encoder.modality_taps.values() for t in taps) + 1

    def feature_dim(self) -> int:
        return self.fixed_feature_dim() + self.encoder.cfg.width

    def features(self, taps: dict[str, list[torch.Tensor]], out: EncoderOutput) -> torch.Tensor:
        """Analytic-head features: [each tap of each modality pooled and L2-normalised, 1, the fused
        adapted embedding (unit-ish scale after its LayerNorm)]. The fixed part never drifts."""
        one = torch.ones_like(out.fused[:, :1])  # no Python int of the batch: it stays dynamic in any export
        return torch.cat([pooled_tap_features(taps, self.encoder.modalities), one, out.fused * self.fused_scale], dim=-1)

    def training_logits(self, taps: dict[str, list[torch.Tensor]],
                        present: torch.Tensor | None = None) -> tuple[torch.Tensor, EncoderOutput]:
        """Logits of the gradient-trained linear head (what the losses train in every mode)."""
        out = self.encoder(taps, present)
        return self.head(out.fused), out

    def forward(self, taps: dict[str, list[torch.Tensor]],
                present: torch.Tensor | None = None) -> tuple[torch.Tensor, EncoderOutput]:
        out = self.encoder(taps, present)
        if self.analytic is not None:
            return self.analytic(self.features(taps, out))[:, : self.head.num_outputs], out
        return self.head(out.fused), out

    def inference_state(self) -> dict[str, torch.Tensor]:
        """Weights a deployed pack needs: everything but the analytic head's running sums."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()
                if not k.startswith(("analytic.gram", "analytic.class_sums"))}

    def teacher(self) -> "MMCLModel":
        """A frozen copy for distillation on the next task. It only computes training logits, so
        it leaves out the ridge head's running sums (a [dim, dim] float64 Gram matrix: 84 MB on
        AV-Digits, held for a whole task)."""
        import copy

        head = self.analytic
        sums = None if head is None else (head.gram, head.class_sums)
        if head is not None:
            head.gram, head.class_sums = head.gram.new_zeros(0, 0), head.class_sums.new_zeros(0, 0)
        try:
            old = copy.deepcopy(self).eval()
        finally:
            if sums is not None:
                head.gram, head.class_sums = sums
        for p in old.parameters():
            p.requires_grad_(False)
        return old

    def describe(self) -> dict:
        """Everything needed to rebuild the module before loading its weights."""
        return {
            "setting": self.setting,
            "head_mode": self.head_mode,
            "n_classes": self.n_classes,
            "ridge": self.ridge,
            "fused_weight": self.fused_weight,
            "novelty": self.novelty.to_dict(),
            "encoder": vars(self.encoder.cfg),
            "modality_taps": {m: [vars(t) for t in taps] for m, taps in self.encoder.modality_taps.items()},
            "head_blocks": self.head.block_sizes(),
            "frozen_experts": self.encoder.frozen_experts(),
        }

    @classmethod
    def from_description(cls, d: dict) -> "MMCLModel":
        taps = {m: tuple(TapSpec(**t) for t in ts) for m, ts in d["modality_taps"].items()}
        blocks = d["head_blocks"]
        # a description without tap_rank is from before 0.3, when taps were projected at full rank
        model = cls(taps, EncoderConfig(**{"tap_rank": 0, **d["encoder"]}), d["setting"], n_classes=d.get("n_classes", sum(blocks)),
                    head_blocks=blocks, head_mode=d.get("head_mode", "linear"), ridge=d.get("ridge", 1e-2),
                    fused_weight=d.get("fused_weight", 2.0), novelty=d.get("novelty"))
        return model

    def save(self, weights: Path, meta: Path, extra: dict | None = None) -> None:
        """The weights as safetensors (the ridge sums, float64 in memory, as float32: ample precision),
        streamed tensor by tensor (``mmcl_edge/state_file.py``), then the description as JSON."""
        from mmcl_edge.state_file import write_state

        write_state(weights, self.state_dict())
        meta.write_text(json.dumps({**self.describe(), **(extra or {})}, indent=2))

    @classmethod
    def load(cls, weights: Path, meta: Path) -> tuple["MMCLModel", dict]:
        from safetensors.torch import load_file

        d = json.loads(meta.read_text())
        model = cls.from_description(d)
        model.load_state_dict(load_file(str(weights)))
        model.encoder.apply_freezing()
        return model, d
