"""``bench encoders``: how much each frozen encoder, alone, tells the classes apart (a linear probe).

For every modality and every encoding its kind allows (``preprocess.ENCODINGS``), taps of all
training and test samples go through the tap cache; a ridge head on the pooled taps is fitted on
all classes at once (no continual learning). Its strength is chosen on a validation split of the
training data (20%, seeded; whole subjects when the test split holds unseen ones); test accuracy is reported beside the validation accuracy, so encoders
are compared, and defaults chosen, without looking at the test split.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mmcl_edge.analytic import StreamingRidgeHead, pooled_tap_features
from mmcl_edge.data import Scenario
from mmcl_edge.preprocess import ENCODINGS
from mmcl_edge.taps import TapCache, backbone_for

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _ridge_accuracy(f_fit, y_fit, f_eval, y_eval, n_classes: int, ridge: float) -> float:
    head = StreamingRidgeHead(f_fit.shape[1], n_classes, ridge)
    head.update(f_fit, torch.from_numpy(y_fit).long())
    head.solve()
    return float((head(f_eval).argmax(dim=1).numpy() == y_eval).mean())


def linear_probe(train_feats: torch.Tensor, y_train: np.ndarray, test_feats: torch.Tensor, y_test: np.ndarray,
                 n_classes: int, seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """Ridge strength chosen on a held-out 20% of the training set, then refitted on all of it.
    With ``groups`` (e.g. subjects, when the test split holds unseen ones) whole groups are held out."""
    rng = np.random.default_rng(seed + 7919)
    if groups is not None and len(np.unique(groups)) >= 2:
        ids = rng.permutation(np.unique(groups))
        held = np.isin(groups, ids[: max(1, len(ids) // 5)])
        val, fit = np.flatnonzero(held), np.flatnonzero(~held)
    else:
        order = rng.permutation(len(y_train))
        n_val = max(1, len(order) // 5)
        val, fit = order[:n_val], order[n_val:]
    scores = {r: _ridge_accuracy(train_feats[fit], y_train[fit], train_feats[val], y_train[val], n_classes, r)
              for r in RIDGE_GRID}
    best = max(RIDGE_GRID, key=lambda r: (scores[r], r))  # ties: the stronger ridge
    return {"ridge": best, "validation_accuracy": scores[best],
            "test_accuracy": _ridge_accuracy(train_feats, y_train, test_feats, y_test, n_classes, best)}


def probe_encoders(scenario: Scenario, cache_root: Path, progress: Callable | None = None,
                   encodings: dict[str, list[str]] | None = None) -> dict:
    """Linear-probe accuracy per (modality, encoding), plus all modalities fused per encoding set."""
    cache = TapCache(cache_root)
    groups = scenario.train.domain if scenario.unseen_test_domains else None
    rows, fused_train, fused_test = [], {}, {}
    for m, spec in scenario.specs.items():
        for enc in (encodings or {}).get(m) or ENCODINGS[spec.kind]:
            s = dataclasses.replace(spec, encoding=enc)
            backbone = backbone_for(s, scenario.train.samples[m][0])
            feats, seconds = {}, 0.0
            for split, ds in (("train", scenario.train), ("test", scenario.test)):
                start = time.perf_counter()
                if progress:
                    with progress(f"{m} {enc} {split}", len(ds)) as bar:
                        taps, _ = cache.get(m, ds.samples[m], s, backbone, progress=bar.advance)
                else:
                    taps, _ = cache.get(m, ds.samples[m], s, backbone)
                seconds += time.perf_counter() - start
                feats[split] = pooled_tap_features({m: [torch.from_numpy(t).float() for t in taps]}, [m])
            res = linear_probe(feats["train"], scenario.train.y, feats["test"], scenario.test.y, scenario.num_classes,
                               groups=groups)
            rows.append({"modality": m, "kind": spec.kind, "encoding": enc, "backbone": backbone.name,
                         "feature_dim": int(feats["train"].shape[1]), "extract_seconds": seconds,
                         "default": enc == spec.encoding, **res})
            if enc == spec.encoding:
                fused_train[m], fused_test[m] = feats["train"], feats["test"]
    fused = linear_probe(torch.cat(list(fused_train.values()), 1), scenario.train.y,
                         torch.cat(list(fused_test.values()), 1), scenario.test.y, scenario.num_classes, groups=groups)
    return {"scenario": scenario.name, "rows": rows, "all_modalities_default_encodings": fused}
