"""``bench cl``: the method, its ablations and the baselines on the same backbones and cached taps."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from mmcl_edge.config import LearnConfig
from mmcl_edge.data import Scenario
from mmcl_edge.learners import create_learner
from mmcl_edge.metrics import summarise
from mmcl_edge.stream import TapSource, run_stream

SUMMARY_KEYS = ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "learn_seconds")


def _mean_matrix(matrices: list[list[list[float | None]]]) -> list[list[float | None]]:
    out = []
    for i, row in enumerate(matrices[0]):
        out.append([None if row[j] is None else float(np.mean([m[i][j] for m in matrices])) for j in range(len(row))])
    return out


def run_cl_benchmark(load: Callable[[int], Scenario], methods: list[str], seeds: int, config: LearnConfig,
                     cache_root: Path, progress: Callable | None = None,
                     on_result: Callable[[str, int, dict], None] | None = None) -> dict:
    """Run every method for seeds 0..seeds-1; ``load(seed)`` gives that seed's task stream."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    scenario = None
    for seed in range(seeds):
        scenario = load(seed)
        source = TapSource(scenario, cache_root, progress)
        for name in methods:
            cfg = config.override({"train.seed": seed})
            learner = create_learner(name, cfg, source.modality_taps, scenario.setting, scenario.num_classes)
            start = time.perf_counter()
            result = run_stream(scenario, learner, source)
            report = result.report()
            report["learn_seconds"] = float(sum(t.get("train_seconds", 0.0) for t in result.tasks))
            report["wall_seconds"] = time.perf_counter() - start
            runs[name].append(report)
            if on_result:
                on_result(name, seed, report)
    methods_out = {}
    for name, reps in runs.items():
        entry: dict = {"seeds": len(reps), "accuracy_matrix": _mean_matrix([r["accuracy_matrix"] for r in reps])}
        for key in SUMMARY_KEYS:
            values = [r[key] for r in reps]
            entry[key] = float(np.mean(values))
            entry[f"{key}_std"] = float(np.std(values))
        entry["per_seed"] = [{k: r[k] for k in (*SUMMARY_KEYS, "accuracy_matrix")} for r in reps]
        methods_out[name] = entry
    return {"scenario": scenario.name if scenario else None, "setting": scenario.setting if scenario else None,
            "seeds": seeds, "config": config.to_dict(), "methods": methods_out}


