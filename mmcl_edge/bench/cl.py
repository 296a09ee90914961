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
from mmcl_edge.learners import create_learner, tap_encoding
from mmcl_edge.learners.baselines import SubsetLearner
from mmcl_edge.stream import TapSource, label_map, missing_modality_accuracy, run_stream

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


def _source(spec: ScenarioSpec, seed: int, cache_root: Path, encoding: str | None = None,
            progress: Callable | None = None) -> TapSource:
    """The seed's stream and tap source for an encoding, built once per process."""
    if (spec, seed) not in _SCENARIOS:
        _SCENARIOS[(spec, seed)] = spec.load(seed)
    key = (spec, seed, encoding)
    if key not in _SOURCES:
        _SOURCES[key] = TapSource(_SCENARIOS[(spec, seed)], cache_root, progress, encoding)
    return _SOURCES[key]


def run_one(spec: ScenarioSpec, name: str, seed: int, config: LearnConfig, cache_root: Path, threads: int) -> dict:
    """One method on one seed's stream; returns its report with ``learn_seconds`` and the final
    accuracy with each modality missing at test time (methods that see every modality)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    source = _source(spec, seed, cache_root, tap_encoding(name))
    scenario = source.scenario
    learner = create_learner(name, config.override({"train.seed": seed}), source.modality_taps, scenario.setting,
                             scenario.num_classes)
    start = time.perf_counter()
    result = run_stream(scenario, learner, source)
    report = result.report()
    report["learn_seconds"] = float(sum(t.get("train_seconds", 0.0) for t in result.tasks))
    report["wall_seconds"] = time.perf_counter() - start
    if not isinstance(learner, SubsetLearner):
        report["missing_modality"] = missing_modality_accuracy(learner, result.heldouts)
    return report


def _mean_matrix(matrices: list[list[list[float | None]]]) -> list[list[float | None]]:
    return [[None if v is None else float(np.mean([m[i][j] for m in matrices])) for j, v in enumerate(row)]
            for i, row in enumerate(matrices[0])]


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _bundle(folder: Path) -> tuple[bytes, str]:
    """The tap cache as one uncompressed tar (taps do not compress) and its sha256."""
    import hashlib
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink()):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def run_one_shipped(spec: ScenarioSpec, name: str, seed: int, config: LearnConfig, digest: str, bundle: list,
                    threads: int) -> dict:
    """``run_one`` on a node of its own: the driver's tap cache, shipped through Ray's object store
    (``bundle``: [ObjectRef]), unpacked once per node into ``$TMPDIR/mmcl-tap-cache-<sha256>`` (kept: the
    next run with the same taps finds it there)."""
    import shutil
    import tarfile
    import tempfile

    import ray

    local = Path(tempfile.gettempdir()) / f"mmcl-tap-cache-{digest[:16]}"
    if not local.is_dir():
        tmp = local.with_name(f"{local.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        import io

        with tarfile.open(fileobj=io.BytesIO(ray.get(bundle[0])), mode="r:") as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.replace(tmp, local)
        except OSError:  # another task on this node was first
            shutil.rmtree(tmp, ignore_errors=True)
    return run_one(spec, name, seed, config, local, threads)


def _run_on_ray(spec: ScenarioSpec, jobs: list[tuple[str, int]], config: LearnConfig, cache_root: Path,
                address: str | None):
    """The jobs as Ray tasks (one CPU, one torch thread each); yields (name, seed, report) as they finish.

    Ray is started here (``ray.init()``) unless ``address`` names a running cluster. The tap cache
    travels with the jobs (``run_one_shipped``): no node reads the driver's cache folder, so nothing
    depends on a path being shared; the data set itself must be readable on every node.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        data, digest = _bundle(cache_root)
        bundle = [ray.put(data)]  # in a list: each task fetches it only when its node has no copy yet
        shipped = {"bytes": len(data), "bundle_seconds": round(time.perf_counter() - t0, 3), "sha256": digest}
        del data
        task = ray.remote(num_cpus=1)(run_one_shipped)
        pending = {task.remote(spec, name, seed, config, digest, bundle, 1): (name, seed) for name, seed in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                name, seed = pending.pop(ref)
                report = ray.get(ref)
                report["tap_cache_shipped"] = shipped
                yield name, seed, report
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
    encodings = list(dict.fromkeys(tap_encoding(name) for name in methods))
    for seed in range(seeds):  # extract every tap once, before any worker reads the cache
        for encoding in encodings:
            source = _source(spec, seed, cache_root, encoding, progress)
            scenario = source.scenario
            lmap = label_map(scenario, len(scenario.tasks) - 1)
            what = f"seed {seed}" + (f" {encoding}" if encoding else "")
            source.taps("train", np.arange(len(scenario.train.y)), lmap, f"{what} train")
            source.taps("test", np.arange(len(scenario.test.y)), lmap, f"{what} test")
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
        missing = [r["missing_modality"] for r in reps if r.get("missing_modality")]
        if missing:
            entry["missing_modality"] = {m: float(np.mean([x[m] for x in missing])) for m in missing[0]}
            entry["missing_modality_std"] = {m: float(np.std([x[m] for x in missing])) for m in missing[0]}
        entry["per_seed"] = [{k: r[k] for k in (*SUMMARY_KEYS, "accuracy_matrix", "missing_modality") if k in r}
                             for r in reps]
        methods_out[name] = entry
    out = {"scenario": scenario.name, "setting": scenario.setting, "seeds": seeds, "workers": workers,
           "config": config.to_dict(), "methods": methods_out}
    shipped = next((r["tap_cache_shipped"] for r in runs.values() if "tap_cache_shipped" in r), None)
    if shipped is not None:
        out["tap_cache_shipped"] = shipped  # bytes of the tap cache each node received, and the time to bundle it
    return out
