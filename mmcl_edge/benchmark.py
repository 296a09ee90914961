"""``bench cl``: the method, its ablations and the baselines on the same backbones and cached taps.

Runs are independent (method x seed), so they go to worker processes with one torch thread each:
the small adapter networks gain little from a second thread, while two runs side by side halve
the wall time on a 2-core machine. Taps are extracted once, up front, in the main process.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np

from mmcl_edge.config import LearnConfig
from mmcl_edge.data import Scenario, load_scenario
from mmcl_edge.learners import create_learner
from mmcl_edge.stream import TapSource, label_map, run_stream

SUMMARY_KEYS = ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "learn_seconds")


@dataclass(frozen=True)
class ScenarioSpec:
    """How to build a seed's task stream (picklable, so worker processes can rebuild it)."""

    name: str | None = "avdigits-cil"
    data: str | None = None
    data_dir: str | None = None
    setting: str = "class-il"
    classes_per_task: int = 2
    validation: bool = False

    def load(self, seed: int) -> Scenario:
        sc = load_scenario(None if self.data else self.name, data=self.data, data_dir=self.data_dir,
                           setting=self.setting, classes_per_task=self.classes_per_task, seed=seed)
        if self.validation:
            from mmcl_edge.data.dataset import validation_scenario

            sc = validation_scenario(sc, seed=seed)
        return sc


_SCENARIOS: dict[tuple, Scenario] = {}  # per process: each seed's stream is loaded once ...
_SOURCES: dict[tuple, TapSource] = {}    # ... and its backbones and cached taps too


def run_one(spec: ScenarioSpec, name: str, seed: int, config: LearnConfig, cache_root: Path, threads: int) -> dict:
    """One method on one seed's stream; returns its report with ``learn_seconds``."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    key = (spec, seed)
    if key not in _SCENARIOS:
        _SCENARIOS[key] = spec.load(seed)
    scenario = _SCENARIOS[key]
    if key not in _SOURCES:
        _SOURCES[key] = TapSource(scenario, cache_root)
    source = _SOURCES[key]
    learner = create_learner(name, config.override({"train.seed": seed}), source.modality_taps, scenario.setting,
                             scenario.num_classes)
    start = time.perf_counter()
    result = run_stream(scenario, learner, source)
    report = result.report()
    report["learn_seconds"] = float(sum(t.get("train_seconds", 0.0) for t in result.tasks))
    report["wall_seconds"] = time.perf_counter() - start
    return report


def _mean_matrix(matrices: list[list[list[float | None]]]) -> list[list[float | None]]:
    return [[None if v is None else float(np.mean([m[i][j] for m in matrices])) for j, v in enumerate(row)]
            for i, row in enumerate(matrices[0])]


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _run_on_ray(spec: ScenarioSpec, jobs: list[tuple[str, int]], config: LearnConfig, cache_root: Path,
                address: str | None):
    """The jobs as Ray tasks (one CPU, one torch thread each); yields (name, seed, report) as they finish.

    Ray is started here (``ray.init()``) unless ``address`` names a running cluster; the tap cache
    must then be at the same path on every node (shared storage), or each task re-extracts taps.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1)(run_one)
        pending = {task.remote(spec, name, seed, config, cache_root, 1): (name, seed) for name, seed in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                name, seed = pending.pop(ref)
                yield name, seed, ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def run_cl_benchmark(spec: ScenarioSpec, methods: list[str], seeds: int, config: LearnConfig, cache_root: Path,
                     progress: Callable | None = None, on_result: Callable[[str, int, dict], None] | None = None,
                     workers: int | None = None, ray: bool = False, ray_address: str | None = None) -> dict:
    """Run every method for seeds 0..seeds-1 and aggregate mean ± std over seeds.

    ``ray=True`` runs the method x seed jobs as Ray tasks (on ``ray_address``, or a Ray started here)
    instead of local worker processes; the jobs and so the results are the same.
    """
    workers = workers or default_workers()
    scenario = None
    for seed in range(seeds):  # extract every tap once, before any worker reads the cache
        scenario = spec.load(seed)
        _SCENARIOS[(spec, seed)] = scenario
        source = _SOURCES[(spec, seed)] = TapSource(scenario, cache_root, progress)
        lmap = label_map(scenario, len(scenario.tasks) - 1)
        source.taps("train", np.arange(len(scenario.train.y)), lmap, f"seed {seed} train")
        source.taps("test", np.arange(len(scenario.test.y)), lmap, f"seed {seed} test")
    jobs = [(name, seed) for seed in range(seeds) for name in methods]
    runs: dict[tuple[str, int], dict] = {}
    if ray:
        for name, seed, report in _run_on_ray(spec, jobs, config, cache_root, ray_address):
            runs[(name, seed)] = report
            if on_result:
                on_result(name, seed, report)
    elif workers == 1:
        for name, seed in jobs:
            runs[(name, seed)] = run_one(spec, name, seed, config, cache_root, 0)
            if on_result:
                on_result(name, seed, runs[(name, seed)])
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_one, spec, name, seed, config, cache_root, 1): (name, seed)
                       for name, seed in jobs}
            for fut in as_completed(futures):
                name, seed = futures[fut]
                runs[(name, seed)] = fut.result()
                if on_result:
                    on_result(name, seed, runs[(name, seed)])
    methods_out = {}
    for name in methods:
        reps = [runs[(name, seed)] for seed in range(seeds)]
        entry: dict = {"seeds": len(reps), "accuracy_matrix": _mean_matrix([r["accuracy_matrix"] for r in reps])}
        for key in SUMMARY_KEYS:
            values = [r[key] for r in reps]
            entry[key] = float(np.mean(values))
            entry[f"{key}_std"] = float(np.std(values))
        entry["per_seed"] = [{k: r[k] for k in (*SUMMARY_KEYS, "accuracy_matrix")} for r in reps]
        methods_out[name] = entry
    return {"scenario": scenario.name, "setting": scenario.setting, "seeds": seeds, "workers": workers,
            "config": config.to_dict(), "methods": methods_out}
