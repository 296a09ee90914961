"""A small deterministic synthetic multi-modal data set, for unit tests only.

Two ``vector`` modalities, each carrying part of the class signal, so fusing them helps; in
domain-IL, each domain adds its own offset to both modalities.
"""
from __future__ import annotations

import numpy as np

from mmcl_edge.data.dataset import MultiModalDataset, Scenario, class_incremental_tasks, domain_incremental_tasks
from mmcl_edge.preprocess import PreprocessSpec


def synthetic_arrays(n_classes: int = 6, per_class: int = 40, dims=(12, 10), domains: int = 1,
                     seed: int = 0, noise: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = [rng.normal(0, 1.6, (n_classes, d)) for d in dims]
    shifts = [rng.normal(0, 1.0, (domains, d)) for d in dims]
    out = {f"x_m{i}": [] for i in range(len(dims))}
    y, dom = [], []
    for d in range(domains):
        for c in range(n_classes):
            for _ in range(per_class):
                for i, dim in enumerate(dims):
                    out[f"x_m{i}"].append(centres[i][c] + shifts[i][d] + rng.normal(0, noise, dim))
                y.append(c)
                dom.append(d)
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
    arrays["y"] = np.asarray(y)
    arrays["domain"] = np.asarray(dom)
    return arrays


def synthetic_scenario(setting: str = "class-il", seed: int = 0, n_classes: int = 6, classes_per_task: int = 2,
                       domains: int = 3) -> Scenario:
    arrays = synthetic_arrays(n_classes=n_classes, domains=1 if setting == "class-il" else domains, seed=seed)
    rng = np.random.default_rng(seed + 1)
    test_mask = rng.random(len(arrays["y"])) < 0.25
    mods = [k[2:] for k in arrays if k.startswith("x_")]

    def ds(mask):
        return MultiModalDataset({m: list(arrays[f"x_{m}"][mask]) for m in mods}, arrays["y"][mask],
                                 arrays["domain"][mask])

    train, test = ds(~test_mask), ds(test_mask)
    specs = {m: PreprocessSpec("vector") for m in mods}
    if setting == "class-il":
        tasks = class_incremental_tasks(train.y, test.y, classes_per_task, seed)
    else:
        tasks = domain_incremental_tasks(train.y, train.domain, test.domain)
    return Scenario(f"synthetic-{'cil' if setting == 'class-il' else 'dil'}", setting, train, test, specs, tasks,
                    [str(c) for c in range(n_classes)])
