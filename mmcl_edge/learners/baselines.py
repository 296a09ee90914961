"""Baselines on the same frozen backbones and cached taps as the method; only the learning rule
differs. Trainable baselines use the method's own adapters (same capacity) and its one training
loop, switching loss terms off or adding one penalty; frozen-feature baselines train nothing."""
from __future__ import annotations

import numpy as np
import torch

from mmcl_edge import losses
from mmcl_edge.analytic import StreamingRidgeHead, pooled_tap_features
from mmcl_edge.config import LearnConfig
from mmcl_edge.learners.adapter import AdapterLearner, to_torch
from mmcl_edge.learners.base import Learner, TaskData
from mmcl_edge.model import MMCLModel

PLAIN_TRAINING = {"loss.distill": 0.0, "loss.preserve": 0.0, "loss.align": 0.0, "freeze.enabled": False,
                  "head": "linear", "train.later_lr_scale": 1.0, "train.modality_dropout": 0.0}


class FinetuneLearner(AdapterLearner):
    """Sequential training with cross-entropy only: the lower bound."""

    name = "finetune"
    overrides = PLAIN_TRAINING

    def __init__(self, config: LearnConfig, modality_taps, setting, n_classes):
        super().__init__(config.override(self.overrides), modality_taps, setting, n_classes)


class LwFLearner(FinetuneLearner):
    """Learning without Forgetting: cross-entropy + logit distillation from the previous model."""

    name = "lwf"
    overrides = {**PLAIN_TRAINING, "loss.distill": 1.0}


class EWCLearner(FinetuneLearner):
    """Online EWC: a diagonal-Fisher-weighted pull of the trainable parts towards their old values."""

    name = "ewc"

    def __init__(self, *args):
        super().__init__(*args)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def extra_loss(self, model: MMCLModel) -> torch.Tensor | None:
        if not self.fisher:
            return None
        total = 0.0
        for n, p in model.named_parameters():
            if n in self.fisher and p.shape == self.fisher[n].shape:
                total = total + (self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
        return 0.5 * self.cfg.baselines.ewc_lambda * total

    def after_task(self, data: TaskData) -> None:
        model = self.model
        model.eval()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        y = torch.from_numpy(data.y).long()
        batches = 0
        for b in range(0, len(data), 32):
            idx = np.arange(b, min(b + 32, len(data)))
            logits, _ = model.training_logits(to_torch(data, idx))
            model.zero_grad(set_to_none=True)
            losses.classification(logits, y[idx]).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
            batches += 1
        for n, f in fisher.items():
            f /= max(batches, 1)
            old = self.fisher.get(n)
            # the head grows in class-IL: older Fisher entries cover the first rows only
            if old is not None and old.shape != f.shape:
                f[tuple(slice(0, s) for s in old.shape)] += old
            elif old is not None:
                f += old
            self.fisher[n] = f
            self.anchor[n] = params[n].detach().clone()
        model.zero_grad(set_to_none=True)


class ReplayLearner(FinetuneLearner):
    """Experience replay: a small class-balanced buffer of cached taps, mixed into each task."""

    name = "er"

    def __init__(self, *args):
        super().__init__(*args)
        self.buffer: TaskData | None = None
        self.rng = np.random.default_rng(self.cfg.train.seed)

    def training_data(self, data: TaskData) -> TaskData:
        return data if self.buffer is None else TaskData.concat([data, self.buffer])

    def after_task(self, data: TaskData) -> None:
        pool = data if self.buffer is None else TaskData.concat([self.buffer, data])
        classes = np.unique(pool.y)
        quota = max(1, self.cfg.baselines.buffer_size // len(classes))
        keep = []
        for c in classes:
            idx = np.flatnonzero(pool.y == c)
            keep.extend(self.rng.choice(idx, size=min(quota, len(idx)), replace=False))
        self.buffer = pool.subset(np.sort(np.array(keep[: self.cfg.baselines.buffer_size])))


class JointLearner(AdapterLearner):
    """Upper bound: after each task, a fresh model trained on all training data seen so far."""

    name = "joint"

    def __init__(self, config: LearnConfig, modality_taps, setting, n_classes):
        cfg = config.override({"loss.distill": 0.0, "loss.preserve": 0.0, "freeze.enabled": False})
        super().__init__(cfg, modality_taps, setting, n_classes)
        self.args = (modality_taps, setting, n_classes)
        self.seen: list[TaskData] = []

    def learn_task(self, task_index: int, data: TaskData, n_seen: int) -> dict:
        self.seen.append(data)
        modality_taps, setting, n_classes = self.args
        self.model = self.new_model(modality_taps, setting, n_classes)
        self.old = None
        return super().learn_task(task_index, TaskData.concat(self.seen), n_seen)


class FrozenFeatureLearner(Learner):
    """Base of the training-free baselines: features straight from the frozen backbones' taps."""

    def __init__(self, config: LearnConfig, modality_taps, setting, n_classes):
        self.cfg, self.modalities, self.n_classes = config, list(modality_taps), n_classes

    @torch.no_grad()
    def features(self, data: TaskData) -> torch.Tensor:
        return torch.cat([pooled_tap_features(to_torch(data, np.arange(b, min(b + 512, len(data)))), self.modalities)
                          for b in range(0, len(data), 512)])


class SimpleCILLearner(FrozenFeatureLearner):
    """SimpleCIL: class prototypes (means of frozen features), nearest prototype by cosine."""

    name = "simplecil"

    def learn_task(self, task_index: int, data: TaskData, n_seen: int) -> dict:
        f = self.features(data)
        if not hasattr(self, "sums"):
            self.sums = torch.zeros(self.n_classes, f.shape[1], dtype=torch.float64)
            self.counts = torch.zeros(self.n_classes, dtype=torch.float64)
        y = torch.from_numpy(data.y).long()
        self.sums.index_add_(0, y, f.double())
        self.counts.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
        return {"train_seconds": 0.0}

    def predict(self, data: TaskData) -> np.ndarray:
        seen = self.counts > 0
        protos = torch.nn.functional.normalize((self.sums[seen] / self.counts[seen, None]).float(), dim=-1)
        sims = torch.nn.functional.normalize(self.features(data), dim=-1) @ protos.T
        return seen.nonzero().flatten()[sims.argmax(dim=1)].numpy()


class RidgeLearner(FrozenFeatureLearner):
    """Closed-form streaming ridge head on the frozen features (optionally randomly projected)."""

    name = "ridge"

    def __init__(self, *args):
        super().__init__(*args)
        self.head: StreamingRidgeHead | None = None
        self.projection: torch.Tensor | None = None

    @property
    def projection_width(self) -> int:
        return self.cfg.baselines.random_projection

    @property
    def ridge(self) -> float:
        return self.cfg.baselines.ridge

    def _project(self, f: torch.Tensor) -> torch.Tensor:
        width = self.projection_width
        if not width:
            return f
        if self.projection is None:
            gen = torch.Generator().manual_seed(self.cfg.train.seed)
            self.projection = torch.randn(f.shape[1], width, generator=gen) / f.shape[1] ** 0.5
        return torch.relu(f @ self.projection)

    def learn_task(self, task_index: int, data: TaskData, n_seen: int) -> dict:
        import time

        start = time.perf_counter()
        f = self._project(self.features(data))
        if self.head is None:
            self.head = StreamingRidgeHead(f.shape[1], self.n_classes, self.ridge)
        self.head.update(f, torch.from_numpy(data.y).long())
        self.head.solve()
        return {"train_seconds": time.perf_counter() - start}

    def predict(self, data: TaskData) -> np.ndarray:
        with torch.no_grad():
            return self.head(self._project(self.features(data))).argmax(dim=1).numpy()


class RanPACLearner(RidgeLearner):
    """RanPAC (McDonnell et al., 2023) without its first-session adapter training: a fixed random
    ReLU projection of the frozen features to a wide space, then the streaming ridge head. The
    strongest published rehearsal-free learner on a frozen pre-trained model."""

    name = "ranpac"

    @property
    def projection_width(self) -> int:
        return self.cfg.baselines.ranpac_projection

    @property
    def ridge(self) -> float:
        return self.cfg.baselines.ranpac_ridge


class RawRidgeLearner(RidgeLearner):
    """No pre-trained model at all: the streaming ridge head on the raw signals, resampled and
    z-scored (each modality's ``raw`` encoding). What a practitioner tries first."""

    name = "raw-ridge"
    encoding = "raw"  # the benchmark feeds this learner taps of the raw encoding

    @property
    def projection_width(self) -> int:
        return 0


class SubsetLearner(Learner):
    """Ablation: any learner restricted to some of the modalities (one alone, or a pair)."""

    def __init__(self, inner_factory, modalities: list[str], modality_taps, *args):
        self.modalities = list(modalities)
        self.inner = inner_factory({m: modality_taps[m] for m in self.modalities}, *args)
        self.name = subset_name(self.inner.name, self.modalities)

    def learn_task(self, task_index: int, data: TaskData, n_seen: int) -> dict:
        return self.inner.learn_task(task_index, data.only(self.modalities), n_seen)

    def predict(self, data: TaskData) -> np.ndarray:
        return self.inner.predict(data.only(self.modalities))


def subset_name(method: str, modalities: list[str]) -> str:
    """``mmcl-imu-only`` for one modality, ``mmcl-imu+depth`` for several."""
    return f"{method}-{modalities[0]}-only" if len(modalities) == 1 else f"{method}-{'+'.join(modalities)}"


BASELINES = {cls.name: cls for cls in (FinetuneLearner, LwFLearner, EWCLearner, ReplayLearner, SimpleCILLearner,
                                       RidgeLearner, RanPACLearner, RawRidgeLearner, JointLearner)}
