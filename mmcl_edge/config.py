"""One typed configuration object for a learning run; saved into the workspace as JSON."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from mmcl_edge.errors import ConfigError


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
    tap_rank: int = 32        # features each tap token is reduced to before the projection (0: none,
                              # the flattened tokens are projected directly, as packs before 0.3 did)


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
    threads: int = 0              # torch CPU threads; 0 = the thread policy (mmcl_edge/threads.py): half the
                                  # cores (1..8), the rest left to a runtime serving beside; env knobs there
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
    ridge: float = 1e-1           # ridge: regularisation, relative to the mean feature energy
    ranpac_projection: int = 4096  # ranpac: width of its fixed random ReLU projection
    ranpac_ridge: float = 1e-1    # ranpac: regularisation, relative to the mean feature energy


@dataclass
class NoveltyConfig:
    """"I don't know this": every answer's distance to the learned classes (mmcl_edge/novelty.py)."""

    false_alarm: float = 0.05     # share of familiar (held-out) samples the threshold flags as unknown


@dataclass
class LearnConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    novelty: NoveltyConfig = field(default_factory=NoveltyConfig)
    head: str = "analytic"        # "linear": the paper's trained head; "analytic": streaming ridge head
    ridge: float = 1e-1           # analytic head: ridge strength relative to the mean feature energy
    drift_compensation: bool = True  # analytic head: carry old sums through the adapters' drift
    fused_weight: float = 2.0     # analytic head: scale of the adapted embedding beside the frozen taps
    pack_weights: str = "float16"  # how a pack stores its weights: "float16", or "int8" (large matrices
                                   # with a scale per output feature; about half the bytes; see
                                   # benchmarks/README.md "UTD-MHAD pack <= 1 MB")

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
                    raise ConfigError(f"unknown config key {key!r}; known: {', '.join(known_keys())}")
                node = node[p]
            if leaf not in node or isinstance(node[leaf], dict):
                raise ConfigError(f"unknown config key {key!r}; known: {', '.join(known_keys())}")
            node[leaf] = value  # checked and coerced by from_dict (strict: "False" is False, "yes" is refused)
        return LearnConfig.from_dict(d)


# Allowed values, checked on load (workspace.json, from_dict) and on --set.
CHOICES = {"head": ("analytic", "linear"), "loss.ce_scope": ("all", "task"), "pack_weights": ("float16", "int8")}
RANGES = {  # key: (low, high, low inclusive); None = unbounded
    "encoder.width": (1, 65536, True), "encoder.experts": (1, 1024, True), "encoder.top_k": (1, 1024, True),
    "encoder.bottleneck": (1, 65536, True), "encoder.depths": (1, 64, True), "encoder.dropout": (0.0, 1.0, True),
    "encoder.tap_rank": (0, 65536, True),
    "loss.temperature": (0.0, None, False), "loss.align_temperature": (0.0, None, False),
    "freeze.per_task": (0, None, True), "freeze.min_plastic": (0, None, True), "freeze.mass_weight": (0.0, 1.0, True),
    "train.epochs": (0, 100000, True), "train.batch_size": (1, 1 << 20, True), "train.lr": (0.0, None, False),
    "train.weight_decay": (0.0, None, True), "train.seed": (0, 2 ** 32 - 1, True), "train.threads": (0, 4096, True),
    "train.later_lr_scale": (0.0, None, True), "baselines.ewc_lambda": (0.0, None, True),
    "baselines.buffer_size": (0, None, True), "baselines.random_projection": (0, None, True),
    "baselines.ridge": (0.0, None, True), "ridge": (0.0, None, True), "fused_weight": (0.0, None, True),
    "baselines.ranpac_projection": (1, 1 << 16, True), "baselines.ranpac_ridge": (0.0, None, True),
    "train.modality_dropout": (0.0, 1.0, True),
    "novelty.false_alarm": (0.0, 0.5, False),
}
NON_NEGATIVE_PREFIX = ("loss.",)  # loss weights: 0 switches a term off, negative is never meant


def known_keys(cls=None, prefix: str = "") -> list[str]:
    cls = cls or LearnConfig
    keys = []
    for f in fields(cls):
        sub = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        keys += known_keys(type(sub), f"{prefix}{f.name}.") if is_dataclass(sub) else [prefix + f.name]
    return keys


def _coerce(key: str, kind: str, value):
    """``value`` as the field's type, strictly: no truthiness, no silent truncation."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    if kind == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, not {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, not {value!r}")
    if kind == "float":
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, not {value!r}")
        try:
            v = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            v = None
        if v is None or not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, not {value!r}")
        return v
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, not {value!r}")
        return value
    return value


def _check_value(key: str, value) -> None:
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}, not {value!r}")
    low, high, inclusive = RANGES.get(key, (0.0 if key.startswith(NON_NEGATIVE_PREFIX) and isinstance(value, float)
                                            else None, None, True))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if low is not None and (value < low or (value == low and not inclusive)):
            raise ConfigError(f"{key} must be {'>=' if inclusive else '>'} {low}, not {value!r}")
        if high is not None and value > high:
            raise ConfigError(f"{key} must be <= {high}, not {value!r}")


def _build(cls, d: dict[str, Any], prefix: str = ""):
    if not isinstance(d, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'config'} must be a mapping, not {d!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: "
                          f"{', '.join(known_keys(cls, prefix))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        value = d[f.name]
        sub = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        key = prefix + f.name
        if is_dataclass(sub):
            kwargs[f.name] = _build(type(sub), value, key + ".")
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        value = _coerce(key, kind, value)
        _check_value(key, value)
        kwargs[f.name] = value
    obj = cls(**kwargs)
    if cls is EncoderConfig and obj.top_k > obj.experts:
        raise ConfigError(f"encoder.top_k ({obj.top_k}) cannot exceed encoder.experts ({obj.experts})")
    return obj
