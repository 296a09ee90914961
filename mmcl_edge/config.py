"""One typed configuration object for a learning run; saved into the workspace as JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any


@dataclass
class EncoderConfig:
    """Shape of the MMEncoder (cross-modality mixture-of-experts side network)."""

    width: int = 128          # width of the common space all modalities are projected into
    experts: int = 8          # experts per depth, shared by all modalities and all tasks
    top_k: int = 2            # experts each (sample, modality) is routed to
    bottleneck: int = 32      # hidden width of each bottleneck-adapter expert
    depths: int = 3           # adapter depths; each reads one tap of every modality
    cross_modal_routing: bool = True  # router sees all modalities (False: each modality alone)
    dropout: float = 0.1


@dataclass
class LossConfig:
    """Weights of the joint objective; a weight of 0 switches a term off (for ablations)."""

    ce: float = 1.0
    ce_scope: str = "all"         # class-IL: "all" seen classes, or "task" (new classes only)
    distill: float = 1.0          # LwF logit distillation from the previous model
    temperature: float = 2.0
    align: float = 0.1            # relaxed cross-modal representation alignment
    align_temperature: float = 0.2
    preserve: float = 5.0         # relational knowledge preservation (batch similarity matrices)
    balance: float = 0.01         # router load balancing, keeps experts in use so freezing has choice


@dataclass
class FreezeConfig:
    """Freezing of influential experts after each task."""

    enabled: bool = True
    per_task: int = 2             # experts frozen per depth after each task
    min_plastic: int = 2          # never freeze below this many trainable experts per depth
    mass_weight: float = 0.5      # influence = w * routing mass + (1 - w) * activation frequency


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 0              # torch CPU threads; 0 = torch's default
    later_lr_scale: float = 0.1   # learning-rate factor for tasks after the first ("slow learner")
    modality_dropout: float = 0.2  # chance to hide each modality of a training sample (never all), so the
                                   # model answers when a sensor drops out; also the weight of one-modality-
                                   # missing copies in the analytic head's sums


@dataclass
class BaselineConfig:
    """Knobs of the baselines (chosen on a validation split; see benchmarks/README.md)."""

    ewc_lambda: float = 1e4       # EWC: weight of the Fisher penalty
    buffer_size: int = 200        # ER: cached-tap samples kept (class-balanced)
    random_projection: int = 0    # ridge: width of the fixed random ReLU projection (0 = none)
    ridge: float = 1e-3           # ridge: regularisation, relative to the mean feature energy
    ranpac_projection: int = 4096  # ranpac: width of its fixed random ReLU projection
    ranpac_ridge: float = 1e-3    # ranpac: regularisation, relative to the mean feature energy


@dataclass
class LearnConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    head: str = "analytic"        # "linear": the paper's trained head; "analytic": streaming ridge head
    ridge: float = 1e-2           # analytic head: ridge strength relative to the mean feature energy
    drift_compensation: bool = True  # analytic head: carry old sums through the adapters' drift
    fused_weight: float = 2.0     # analytic head: scale of the adapted embedding beside the frozen taps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LearnConfig":
        return _build(cls, d)

    def override(self, dotted: dict[str, Any]) -> "LearnConfig":
        """A copy with ``{"loss.align": 0.0, ...}`` applied; unknown keys are an error."""
        d = self.to_dict()
        for key, value in dotted.items():
            node = d
            *path, leaf = key.split(".")
            for p in path:
                if p not in node or not isinstance(node[p], dict):
                    raise KeyError(f"unknown config key {key!r}")
                node = node[p]
            if leaf not in node:
                raise KeyError(f"unknown config key {key!r}")
            node[leaf] = type(node[leaf])(value) if node[leaf] is not None and not isinstance(value, type(node[leaf])) else value
        return LearnConfig.from_dict(d)


def _build(cls, d: dict[str, Any]):
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        value = d[f.name]
        sub = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        kwargs[f.name] = _build(type(sub), value) if is_dataclass(sub) and isinstance(value, dict) else value
    return cls(**kwargs)
