"""The paper's learner: MoE adapters + head trained per task with the joint objective, then
freezing of influential experts. Baselines that train the same adapters reuse this class and
switch terms on or off (finetune, LwF) or add one penalty (EWC, replay)."""
from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from mmcl_edge import freezing, losses, threads
from mmcl_edge.analytic import fit_drift_map
from mmcl_edge.config import LearnConfig
from mmcl_edge.learners.base import Learner, TaskData
from mmcl_edge.model import MMCLModel
from mmcl_edge.novelty import leave_one_out_novelty
from mmcl_edge.optim import OneCycleAdamW


def to_torch(data: TaskData, idx=None) -> dict[str, list[torch.Tensor]]:
    sel = slice(None) if idx is None else idx
    return {m: [torch.from_numpy(np.ascontiguousarray(t[sel])).float() for t in ts] for m, ts in data.taps.items()}


def presence(data: TaskData, idx=None) -> torch.Tensor | None:
    """The ``present`` mask of ``data`` (rows ``idx``) for the encoder; None when all are there."""
    if data.present is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(data.present[slice(None) if idx is None else idx])).float()


def modality_dropout(present: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Drop each present modality of each sample with probability ``p``, never all of a sample's."""
    keep = (torch.rand(present.shape, generator=gen) >= p).float() * present
    empty = keep.sum(dim=1) == 0
    keep[empty] = present[empty]
    return keep


def _drifting(features: torch.Tensor, n_fixed: int) -> torch.Tensor:
    """The columns of analytic-head features that a drift map reads: the constant-1 bias (the last
    fixed one) and the adapted features after it, copied so the whole width is not kept."""
    return features[:, n_fixed - 1:].clone()


class AdapterLearner(Learner):
    name = "mmcl"

    def __init__(self, config: LearnConfig, modality_taps, setting: str, n_classes: int, model: MMCLModel | None = None):
        self.cfg = config
        threads.apply_torch(config.train.threads)  # before the first task's taps are extracted, too
        self.setting = setting
        self.model = model or self.new_model(modality_taps, setting, n_classes)
        self.old: MMCLModel | None = None
        self.frozen_log: list[list[list[int]]] = []

    def new_model(self, modality_taps, setting: str, n_classes: int) -> MMCLModel:
        """A freshly initialised model; seeded, so it does not depend on what the process did before."""
        cfg = self.cfg
        with torch.random.fork_rng():
            torch.manual_seed(cfg.train.seed)
            return MMCLModel(modality_taps, cfg.encoder, setting, n_classes=n_classes, head_mode=cfg.head,
                             ridge=cfg.ridge, fused_weight=cfg.fused_weight)

    # hooks for baselines -------------------------------------------------------------------
    def extra_loss(self, model: MMCLModel) -> torch.Tensor | None:
        return None

    def training_data(self, data: TaskData) -> TaskData:
        return data

    def after_task(self, data: TaskData) -> None:
        return None

    # the shared loop ------------------------------------------------------------------------
    def learn_task(self, task_index: int, data: TaskData, n_seen: int) -> dict:
        cfg, model = self.cfg, self.model
        start = time.perf_counter()  # learning time: training, freezing and the head, all of it
        seed = cfg.train.seed * 1000 + task_index
        torch.manual_seed(seed)
        threads.apply_torch(cfg.train.threads)  # train.threads, else the thread policy (mmcl_edge.threads)
        n_old = model.head.num_outputs if self.setting == "class-il" else 0
        if n_old and int(data.y.min()) < n_old:
            n_old = 0  # the task brings more samples of known classes: cross-entropy over every class
        model.grow_classes(n_seen)
        train = self.training_data(data)
        before = ([_drifting(self._features(v), model.fixed_feature_dim()) for v, _ in self._analytic_views(data)]
                  if model.analytic is not None and cfg.drift_compensation and not model.analytic.empty else None)
        params = [p for p in model.parameters() if p.requires_grad]
        # a previous model exists: adapt slowly, so old classes' features drift little (SLCA's slow learner)
        lr = cfg.train.lr * (cfg.train.later_lr_scale if self.old is not None else 1.0)
        steps_per_epoch = max(1, int(np.ceil(len(train) / cfg.train.batch_size)))
        # PyTorch's AdamW + OneCycleLR, bit for bit, without the 73 MB compiler stack they import (optim.py)
        opt = OneCycleAdamW(params, max_lr=lr, weight_decay=cfg.train.weight_decay,
                            total_steps=cfg.train.epochs * steps_per_epoch, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        y_all = torch.from_numpy(train.y).long()
        p_drop = cfg.train.modality_dropout if len(train.taps) > 1 else 0.0
        present_all = torch.from_numpy(train.presence()).float()
        lc = cfg.loss
        model.train()
        for _ in range(cfg.train.epochs):
            order = torch.randperm(len(train), generator=gen).numpy()
            for b in range(0, len(order), cfg.train.batch_size):
                idx = order[b:b + cfg.train.batch_size]
                if len(idx) < 2:
                    continue
                taps, y = to_torch(train, idx), y_all[idx]
                present = present_all[idx]
                if p_drop:
                    present = modality_dropout(present, p_drop, gen)
                logits, out = model.training_logits(taps, present)
                if lc.ce_scope == "task" and n_old:
                    loss = lc.ce * losses.classification(logits[:, n_old:], y - n_old)
                else:
                    loss = lc.ce * losses.classification(logits, y)
                if lc.balance:
                    loss = loss + lc.balance * losses.load_balance(out.probs, out.gates)
                if lc.align:
                    loss = loss + lc.align * losses.relaxed_alignment(out.per_modality, y, lc.align_temperature)
                if self.old is not None and (lc.distill or lc.preserve):
                    with torch.no_grad():
                        old_logits, old_out = self.old.training_logits(taps, present)
                    if lc.distill and old_logits.shape[-1] > 0:
                        loss = loss + lc.distill * losses.distillation(logits, old_logits, lc.temperature)
                    if lc.preserve:
                        loss = loss + lc.preserve * 0.5 * (
                            losses.relational_preservation(out.fused, old_out.fused)
                            + losses.relational_preservation(out.per_modality, old_out.per_modality))
                extra = self.extra_loss(model)
                if extra is not None:
                    loss = loss + extra
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        newly_frozen = self._freeze_influential(data) if cfg.freeze.enabled else []
        if model.analytic is not None:
            self._update_analytic(data, before)
        self.after_task(data)
        self.old = model.teacher()
        return {"train_seconds": time.perf_counter() - start, "newly_frozen_experts": newly_frozen,
                "frozen_experts": model.encoder.frozen_experts()}

    @torch.no_grad()
    def _freeze_influential(self, data: TaskData) -> list[list[int]]:
        enc = self.model.encoder
        stats = freezing.RoutingStats(enc.cfg.depths, enc.cfg.experts)
        for b in range(0, len(data), 256):
            stats.update(enc(to_torch(data, np.arange(b, min(b + 256, len(data))))).gates)
        chosen = freezing.choose_experts_to_freeze(stats.influence(self.cfg.freeze.mass_weight),
                                                   enc.frozen_experts(), self.cfg.freeze)
        for l, experts in enumerate(chosen):
            for e in experts:
                enc.pools[l].freeze(e)
        self.frozen_log.append(chosen)
        return chosen

    @torch.no_grad()
    def _features(self, data: TaskData) -> torch.Tensor:
        """Analytic-head features of ``data`` under the model as it is now."""
        self.model.eval()
        parts = []
        for b in range(0, len(data), 256):
            idx = np.arange(b, min(b + 256, len(data)))
            taps = to_torch(data, idx)
            parts.append(self.model.features(taps, self.model.encoder(taps, presence(data, idx))))
        return torch.cat(parts)

    def _analytic_views(self, data: TaskData) -> list[tuple[TaskData, float]]:
        """What the ridge head's sums take in: every sample, and (with modality dropout ``p``) the
        same samples with each proper subset of modalities missing, weighted ``p ** missing``, so
        that the closed-form head also answers when one sensor, or all but one, drop out."""
        views = [(data, 1.0)]
        p, mods = self.cfg.train.modality_dropout, list(data.taps)
        if p > 0 and len(mods) > 1:
            for k in range(1, len(mods)):
                for gone in itertools.combinations(mods, k):
                    view = data
                    for m in gone:
                        view = view.without(m)
                    views.append((view, p ** k))
        return views

    @torch.no_grad()
    def _update_analytic(self, data: TaskData, before: list[torch.Tensor] | None) -> None:
        """Carry the old sums through the adapters' drift on this task, add this task, re-solve."""
        head, views = self.model.analytic, self._analytic_views(data)
        after = [self._features(v) for v, _ in views]
        if before is not None:
            n_fixed = self.model.fixed_feature_dim()
            # the map's rows from the bias on: the same numbers as from whole features (fit_drift_map
            # reads no other column), without [views x samples, dim] copies of both sides
            drift = fit_drift_map(torch.cat(before), torch.cat([_drifting(f, n_fixed) for f in after]), 1, moving_only=True)
            cols = drift.new_zeros(head.gram.shape[0], drift.shape[1])
            cols[n_fixed - 1:] = drift
            head.transform(cols, keep=n_fixed)
        y = torch.from_numpy(data.y).long()
        for f, (_, weight) in zip(after, views):
            head.update(f, y, weight)
        head.solve()
        n_seen = self.model.head.num_outputs
        self.model.novelty.add(leave_one_out_novelty(head, after[0], y, n_seen, data.groups),
                               self.cfg.novelty.false_alarm)

    @torch.no_grad()
    def logits(self, data: TaskData) -> np.ndarray:
        self.model.eval()
        outs = []
        for b in range(0, len(data), 512):
            idx = np.arange(b, min(b + 512, len(data)))
            outs.append(self.model(to_torch(data, idx), presence(data, idx))[0])
        return torch.cat(outs).numpy()

    def predict(self, data: TaskData) -> np.ndarray:
        return self.logits(data).argmax(axis=1)
