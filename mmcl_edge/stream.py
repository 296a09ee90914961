"""The one task step shared by the device and the benchmark, the method and every baseline: a task's
taps from the cache, learn it, evaluate on the held-out data of every task so far."""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mmcl_edge.backbones import TappedBackbone
from mmcl_edge.data import DataFormatError, MultiModalDataset, Scenario
from mmcl_edge.data.dataset import TaskInput, scenario_task
from mmcl_edge.learners.base import Learner, TaskData
from mmcl_edge.metrics import summarise
from mmcl_edge.preprocess import ENCODINGS, PreprocessSpec
from mmcl_edge.runtime import memory
from mmcl_edge.taps import TapCache, backbone_for


class TapSource:
    """The frozen backbones of a workspace's modalities and the cache of their taps.

    ``encoding`` replaces every modality's encoding where its kind allows it (``"raw"``: the
    signals themselves, for the raw-ridge baseline).
    """

    def __init__(self, scenario: Scenario, cache_root: Path, progress: Callable | None = None,
                 encoding: str | None = None):
        examples = {m: _first_present(scenario.train, m) for m in scenario.specs}
        self._setup(scenario.specs, cache_root, progress, encoding, examples=examples)
        self.scenario = scenario

    @classmethod
    def for_specs(cls, specs: dict[str, PreprocessSpec], shapes: dict[str, tuple[int, ...]], cache_root: Path,
                  progress: Callable | None = None) -> "TapSource":
        """A source for a workspace that has no data set of its own (it is taught task by task):
        backbones are built from the preprocessed input shapes it remembers."""
        self = cls.__new__(cls)
        self._setup(specs, cache_root, progress, None, shapes=shapes)
        self.scenario = None
        self.scenario_loader = _no_scenario  # a workspace bound to a stream sets its own loader
        return self

    def _setup(self, specs, cache_root, progress, encoding, examples=None, shapes=None):
        self.cache = TapCache(cache_root)
        self.progress = progress  # progress(description, total) -> context manager with .advance(n)
        self.specs = {m: (dataclasses.replace(s, encoding=encoding) if encoding in ENCODINGS[s.kind] else s)
                      for m, s in specs.items()}
        self._build = lambda: {m: backbone_for(spec, None if examples is None else examples[m],
                                               shape=None if shapes is None else shapes[m])
                               for m, spec in self.specs.items()}
        self._backbones: dict[str, TappedBackbone] | None = None
        self._taps = {m: b.taps for m, b in self.backbones.items()}

    @property
    def backbones(self) -> dict[str, TappedBackbone]:
        """The frozen PyTorch backbones, built when asked for: only tap extraction and a backbone
        export need them, and ``release_backbones`` lets them go in between (AV-Digits: 27 MB of
        weights a learner held through training and the ridge head's solve)."""
        if self._backbones is None:
            self._backbones = self._build()
        return self._backbones

    def release_backbones(self) -> None:
        """Drop the backbones until they are needed again (``memory.release`` returns the memory)."""
        self._backbones = None

    @property
    def modality_taps(self):
        return self._taps

    def taps_of(self, ds: MultiModalDataset, y: np.ndarray, what: str = "") -> tuple[TaskData, float, int]:
        """Taps of every sample of ``ds`` (labelled ``y``, head indices). A sample that lacks a
        modality gets zero taps and a 0 in ``present`` for it, as the runtime feeds them; nothing
        is extracted or cached for it."""
        out, seconds, extracted = {}, 0.0, 0
        masks = [ds.presence(m) for m in self.specs]
        for (m, spec), mask in zip(self.specs.items(), masks):
            rows = np.flatnonzero(mask)
            samples = [ds.samples[m][i] for i in rows]
            ctx = self.progress(f"taps {m} {what}".strip(), len(samples)) if self.progress else nullcontext(None)
            with ctx as bar:
                arrays, stats = self.cache.get(m, samples, spec, self.backbones[m],
                                               progress=(bar.advance if bar is not None else None))
            if len(rows) < len(ds):
                full = [np.zeros((len(ds), *t_shape(tap)), np.float32) for tap in self._taps[m]]
                for f, a in zip(full, arrays):
                    f[rows] = a
                arrays = full
            out[m] = arrays
            seconds += stats.seconds
            extracted += stats.extracted
        present = None if all(mk.all() for mk in masks) else np.stack(masks, axis=1).astype(np.float32)
        return TaskData(out, np.asarray(y, dtype=np.int64), present, ds.domain), seconds, extracted

    def taps(self, split: str, idx: np.ndarray, label_map: dict[int, int], what: str = "") -> tuple[TaskData, float, int]:
        """Taps of samples ``idx`` of the scenario's ``split``, labels mapped to head indices."""
        scenario = self.scenario if self.scenario is not None else self.scenario_loader()
        ds = (scenario.train if split == "train" else scenario.test).subset(idx)
        return self.taps_of(ds, np.array([label_map[int(c)] for c in ds.y]), what)


def _no_scenario():
    raise DataFormatError("this tap source has no data set of its own (a workspace taught task by task)")


def t_shape(tap) -> tuple[int, int]:
    return (tap.tokens, tap.dim)


def _first_present(ds: MultiModalDataset, modality: str) -> np.ndarray:
    rows = np.flatnonzero(ds.presence(modality))
    if not len(rows):
        raise DataFormatError(f"no training sample has the modality {modality!r}")
    return ds.samples[modality][rows[0]]


def label_map(scenario: Scenario, upto: int) -> dict[int, int]:
    """Scenario label -> head index. Class-IL: order of arrival; domain-IL: the label itself."""
    if scenario.setting == "class-il":
        return {c: i for i, c in enumerate(scenario.classes_seen(upto))}
    return {c: c for c in range(scenario.num_classes)}


def add_classes(class_names: list[str], task: TaskInput) -> list[str]:
    """The head's class names after ``task``: names it has not seen are appended, in the order of
    their label in the task (a known name only brings more samples of its class)."""
    names = list(class_names)
    for c in np.unique(task.train.y):
        name = task.names[int(c)]
        if name not in names:
            names.append(name)
    return names


def task_taps(source: TapSource, task: TaskInput, class_names: list[str], what: str = ""
              ) -> tuple[TaskData, TaskData | None, float, int]:
    """A task's training and held-out taps, labelled with head indices of ``class_names``."""
    index = {n: i for i, n in enumerate(class_names)}

    def head_labels(ds):
        missing = sorted({n for n in task.label_names(ds) if n not in index})
        if missing:
            raise DataFormatError(f"held-out samples of class(es) {', '.join(missing)} that no task has taught")
        return np.array([index[n] for n in task.label_names(ds)], dtype=np.int64)

    train, seconds, extracted = source.taps_of(task.train, head_labels(task.train), f"{what} train".strip())
    heldout = None
    if task.heldout is not None and len(task.heldout):
        heldout, s, n = source.taps_of(task.heldout, head_labels(task.heldout), f"{what} held-out".strip())
        seconds += s
        extracted += n
    return train, heldout, seconds, extracted


def accuracy_row(learner: Learner, heldouts: list[TaskData | None]) -> list[float | None]:
    """Accuracy on each task's held-out data (None where a task kept none)."""
    return [float(np.mean(learner.predict(h) == h.y)) if h is not None and len(h) else None for h in heldouts]


@dataclass
class StreamResult:
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)
    heldouts: list[TaskData | None] = field(default_factory=list)  # taps of each task's held-out data

    def report(self) -> dict:
        return {"accuracy_matrix": self.accuracy_matrix, "tasks": self.tasks, **summarise(self.accuracy_matrix)}


def start_task_peak() -> bool:
    """Start measuring a task's peak resident memory, before its taps are extracted: memory freed
    by the previous task goes back to the system first, so the peak is this task's own. False where
    only the process's all-time peak can be read."""
    memory.release()
    return memory.reset_peak()


def task_peak(per_task: bool) -> dict:
    """The record's ``peak_rss_mb`` (MB) and its scope: ``task`` since ``start_task_peak``, or ``process``."""
    return {"peak_rss_mb": memory.peak_rss_mb(), "peak_rss_scope": "task" if per_task else "process"}


def learn_one_task(learner: Learner, t: int, train: TaskData, n_seen: int,
                   heldouts: list[TaskData | None], peak_started: bool | None = None) -> tuple[list[float | None], dict]:
    """Learn task ``t`` from its training taps and evaluate on the held-out data of every task so
    far (``heldouts[j]``: task j's, this one's last). The one step that the workspace (every task a
    device is taught) and the benchmark (every method and baseline) share. Returns (row of R,
    the task's learning record). ``peak_started``: what ``start_task_peak`` returned before the
    task's taps were extracted (None: the peak is measured from here)."""
    per_task = start_task_peak() if peak_started is None else peak_started
    info = learner.learn_task(t, train, n_seen)
    row = accuracy_row(learner, heldouts)
    return row, {"train_samples": int(len(train)), **info, **task_peak(per_task)}


def scenario_classes(scenario: Scenario) -> list[str]:
    """The head's class names before the first task: none in class-IL (they arrive with their
    tasks); every class in domain-IL (one fixed label set, new conditions per task)."""
    return [] if scenario.setting == "class-il" else list(scenario.class_names)


def missing_modality_accuracy(learner: Learner, heldouts: list[TaskData | None]) -> dict[str, float]:
    """Final average accuracy with each modality missing from every held-out sample (the learner as
    it is after the last task): what a sensor dropping out costs."""
    tests = [h for h in heldouts if h is not None and len(h)]
    if not tests or len(tests[0].taps) < 2:
        return {}
    return {m: float(np.mean([np.mean(learner.predict(t.without(m)) == t.y) for t in tests])) for m in tests[0].taps}


def run_stream(scenario: Scenario, learner: Learner, source: TapSource, on_task: Callable | None = None) -> StreamResult:
    """Every task of a built-in stream, produced as the device receives tasks (``scenario_task``)."""
    tasks = (scenario_task(scenario, t) for t in range(len(scenario.tasks)))
    return run_tasks(tasks, learner, source, scenario_classes(scenario), on_task)


def run_tasks(tasks, learner: Learner, source: TapSource, classes: list[str] | None = None,
              on_task: Callable | None = None) -> StreamResult:
    """Learn ``tasks`` (TaskInputs) in order with one learner, evaluating on every held-out set so far."""
    result = StreamResult()
    classes = list(classes or [])
    for t, task in enumerate(tasks):
        classes = add_classes(classes, task)
        per_task = start_task_peak()
        train, heldout, extract_s, extracted = task_taps(source, task, classes, f"task {t}")
        source.release_backbones()
        memory.release()  # the backbones and their activations: freed, but glibc's heap would keep them
        result.heldouts.append(heldout)
        row, info = learn_one_task(learner, t, train, len(classes), result.heldouts, per_task)
        record = {"index": t, "name": task.name, "classes": [task.names[int(c)] for c in np.unique(task.train.y)],
                  "extract_seconds": extract_s, "samples_extracted": extracted, **info}
        result.accuracy_matrix.append(row)
        result.tasks.append(record)
        if on_task:
            on_task(t, row, record)
    result.accuracy_matrix = square(result.accuracy_matrix)
    return result


def square(matrix: list[list[float | None]]) -> list[list[float | None]]:
    """Rows padded with None to the number of tasks so far (a task cannot be tested before it arrives)."""
    n = len(matrix)
    return [list(row) + [None] * (n - len(row)) for row in matrix]
