"""The one task loop shared by the method and every baseline: taps from the cache, learn a task,
evaluate on every task seen so far, record the accuracy matrix and timings."""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mmcl_edge.backbones import TappedBackbone
from mmcl_edge.data import Scenario
from mmcl_edge.learners.base import Learner, TaskData
from mmcl_edge.metrics import summarise
from mmcl_edge.preprocess import ENCODINGS
from mmcl_edge.runtime import memory
from mmcl_edge.taps import TapCache, backbone_for


class TapSource:
    """The frozen backbones of a scenario's modalities and the cache of their taps.

    ``encoding`` replaces every modality's encoding where its kind allows it (``"raw"``: the
    signals themselves, for the raw-ridge baseline).
    """

    def __init__(self, scenario: Scenario, cache_root: Path, progress: Callable | None = None,
                 encoding: str | None = None):
        self.scenario = scenario
        self.cache = TapCache(cache_root)
        self.progress = progress  # progress(description, total) -> context manager with .advance(n)
        self.specs = {m: (dataclasses.replace(s, encoding=encoding) if encoding in ENCODINGS[s.kind] else s)
                      for m, s in scenario.specs.items()}
        self.backbones: dict[str, TappedBackbone] = {
            m: backbone_for(spec, scenario.train.samples[m][0]) for m, spec in self.specs.items()}

    @property
    def modality_taps(self):
        return {m: b.taps for m, b in self.backbones.items()}

    def taps(self, split: str, idx: np.ndarray, label_map: dict[int, int], what: str = "") -> tuple[TaskData, float, int]:
        ds = self.scenario.train if split == "train" else self.scenario.test
        out, seconds, extracted = {}, 0.0, 0
        for m, spec in self.specs.items():
            samples = [ds.samples[m][i] for i in idx]
            ctx = self.progress(f"taps {m} {what}".strip(), len(samples)) if self.progress else nullcontext(None)
            with ctx as bar:
                arrays, stats = self.cache.get(m, samples, spec, self.backbones[m],
                                               progress=(bar.advance if bar is not None else None))
            out[m] = arrays
            seconds += stats.seconds
            extracted += stats.extracted
        y = np.array([label_map[int(c)] for c in ds.y[idx]])
        return TaskData(out, y), seconds, extracted


def label_map(scenario: Scenario, upto: int) -> dict[int, int]:
    """Scenario label -> head index. Class-IL: order of arrival; domain-IL: the label itself."""
    if scenario.setting == "class-il":
        return {c: i for i, c in enumerate(scenario.classes_seen(upto))}
    return {c: c for c in range(scenario.num_classes)}


@dataclass
class StreamResult:
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)

    def report(self) -> dict:
        return {"accuracy_matrix": self.accuracy_matrix, "tasks": self.tasks, **summarise(self.accuracy_matrix)}


def learn_one_task(scenario: Scenario, learner: Learner, source: TapSource, t: int,
                   train_override: TaskData | None = None) -> tuple[list[float | None], dict]:
    """Learn task ``t`` and evaluate on every task; returns (row of R, task record)."""
    task = scenario.tasks[t]
    lmap = label_map(scenario, t)
    per_task_peak = memory.reset_peak()
    data, extract_s, extracted = source.taps("train", task.train_idx, lmap, f"task {t} train")
    if train_override is not None:
        data = train_override
    n_seen = len(lmap) if scenario.setting == "class-il" else scenario.num_classes
    info = learner.learn_task(t, data, n_seen)
    row: list[float | None] = []
    for j, other in enumerate(scenario.tasks):
        if scenario.setting == "class-il" and j > t:
            row.append(None)
            continue
        test, s, n = source.taps("test", other.test_idx, label_map(scenario, max(j, t)), f"task {j} test")
        extract_s += s
        extracted += n
        row.append(float(np.mean(learner.predict(test) == test.y)) if len(test) else None)
    record = {"index": t, "name": task.name, "classes": [scenario.class_names[c] for c in task.classes],
              "train_samples": int(len(task.train_idx)), "extract_seconds": extract_s,
              "samples_extracted": extracted, **info,
              # resident memory of the learning process: its peak during this task (else since it began)
              "peak_rss_mb": memory.peak_rss_mb(), "peak_rss_scope": "task" if per_task_peak else "process"}
    return row, record


def missing_modality_accuracy(scenario: Scenario, learner: Learner, source: TapSource) -> dict[str, float]:
    """Final average accuracy with each modality missing from every test sample (the learner as it
    is after the last task): what a sensor dropping out costs."""
    if len(scenario.modalities) < 2:
        return {}
    last = len(scenario.tasks) - 1
    tests = [source.taps("test", task.test_idx, label_map(scenario, last))[0] for task in scenario.tasks]
    out = {}
    for m in scenario.modalities:
        row = [float(np.mean(learner.predict(t.without(m)) == t.y)) if len(t) else None for t in tests]
        out[m] = float(np.mean([v for v in row if v is not None]))
    return out


def run_stream(scenario: Scenario, learner: Learner, source: TapSource, on_task: Callable | None = None) -> StreamResult:
    result = StreamResult()
    for t in range(len(scenario.tasks)):
        row, record = learn_one_task(scenario, learner, source, t)
        result.accuracy_matrix.append(row)
        result.tasks.append(record)
        if on_task:
            on_task(t, row, record)
    return result
