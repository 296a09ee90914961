"""The in-memory shape of a multi-modal data set and of a task stream over it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmcl_edge.preprocess import PreprocessSpec, fit_vector_scaling


from mmcl_edge.errors import DataFormatError  # noqa: E402  (one hierarchy: mmcl_edge.errors)


@dataclass
class MultiModalDataset:
    """Raw samples per modality (a list: clips may differ in length), integer labels, domains.

    ``present`` marks, per modality, the samples that have it (a review without a title, a window in
    which a sensor sent nothing); None = every sample has every modality. An absent sample's array
    is a placeholder that nothing reads.
    """

    samples: dict[str, list[np.ndarray]]
    y: np.ndarray
    domain: np.ndarray | None = None
    present: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def presence(self, modality: str) -> np.ndarray:
        """Boolean [N]: which samples have ``modality``."""
        if self.present is None or modality not in self.present:
            return np.ones(len(self.y), bool)
        return np.asarray(self.present[modality], bool)

    def subset(self, idx: np.ndarray) -> "MultiModalDataset":
        idx = np.asarray(idx, dtype=int)
        return MultiModalDataset(
            {m: [s[i] for i in idx] for m, s in self.samples.items()}, self.y[idx],
            None if self.domain is None else self.domain[idx],
            None if self.present is None else {m: np.asarray(p)[idx] for m, p in self.present.items()})


@dataclass
class TaskInput:
    """One task as it arrives on the device: labelled samples (``y`` indexes ``names``, the class
    names), optional held-out samples labelled the same way, and where it came from.

    Every producer (a data folder, a robot's bag, the service's inbox, a benchmark scenario, the
    Python API) makes one of these, and ``Workspace.learn_task`` is the one path that learns it.
    """

    train: MultiModalDataset
    names: list[str]
    heldout: MultiModalDataset | None = None
    origin: dict = field(default_factory=dict)
    name: str = ""

    def label_names(self, ds: MultiModalDataset) -> list[str]:
        return [self.names[int(c)] for c in ds.y]

    def samples_per_class(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.label_names(self.train):
            counts[n] = counts.get(n, 0) + 1
        return counts


@dataclass
class Task:
    """One step of the stream: which train/test samples belong to it and which classes it adds."""

    index: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    classes: list[int]
    name: str = ""


@dataclass
class Scenario:
    """A task stream: train/test data, the modality specs and the ordered tasks."""

    name: str
    setting: str  # "class-il" or "domain-il"
    train: MultiModalDataset
    test: MultiModalDataset
    specs: dict[str, PreprocessSpec]
    tasks: list[Task]
    class_names: list[str] = field(default_factory=list)
    # the test split holds domains (e.g. people) never trained on: validation must hold some out too
    unseen_test_domains: bool = False

    @property
    def modalities(self) -> list[str]:
        return list(self.specs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def classes_seen(self, upto: int) -> list[int]:
        seen: list[int] = []
        for t in self.tasks[: upto + 1]:
            seen.extend(c for c in t.classes if c not in seen)
        return seen


def scenario_task(scenario: Scenario, t: int) -> TaskInput:
    """Task ``t`` of a built-in stream as the device would receive it: its training samples and its
    share of the test split as held-out data, labelled with class names."""
    task = scenario.tasks[t]
    return TaskInput(scenario.train.subset(task.train_idx), list(scenario.class_names),
                     scenario.test.subset(task.test_idx),
                     {"scenario": scenario.name, "task": t}, task.name)


def class_incremental_tasks(y_train: np.ndarray, y_test: np.ndarray, classes_per_task: int,
                            seed: int) -> list[Task]:
    """Split the classes into tasks of ``classes_per_task`` in a seeded random order."""
    classes = np.unique(y_train)
    if classes_per_task < 1:
        raise DataFormatError("--classes-per-task must be at least 1")
    if len(classes) < 2:
        raise DataFormatError("class-incremental learning needs at least 2 classes in y")
    order = np.random.default_rng(seed).permutation(classes)
    tasks = []
    for t, start in enumerate(range(0, len(order), classes_per_task)):
        cls = sorted(int(c) for c in order[start:start + classes_per_task])
        tasks.append(Task(t, np.flatnonzero(np.isin(y_train, cls)), np.flatnonzero(np.isin(y_test, cls)),
                          cls, f"classes {cls}"))
    return tasks


def domain_incremental_tasks(y_train: np.ndarray, d_train: np.ndarray | None, d_test: np.ndarray | None,
                             names: dict[int, str] | None = None) -> list[Task]:
    """One task per domain id, in increasing id order; every task has the full label set."""
    if d_train is None or d_test is None:
        raise DataFormatError("domain-incremental learning needs a 'domain' array in train.npz and test.npz")
    classes = sorted(int(c) for c in np.unique(y_train))
    tasks = []
    for t, d in enumerate(sorted(int(v) for v in np.unique(d_train))):
        test_idx = np.flatnonzero(d_test == d)
        if len(test_idx) == 0:
            raise DataFormatError(f"domain {d} has training samples but no test samples")
        tasks.append(Task(t, np.flatnonzero(d_train == d), test_idx, classes,
                          (names or {}).get(d, f"domain {d}")))
    return tasks


def validation_scenario(scenario: Scenario, fraction: float = 0.2, seed: int = 0) -> Scenario:
    """The same task stream with each task's test set replaced by a held-out part of its training set.

    Hyper-parameters are chosen on this, never on the test split. When the test split holds
    domains never trained on (``unseen_test_domains``, e.g. a cross-subject split), whole training
    domains are held out, about ``fraction`` of them: unseen people are only mimicked by unseen
    people. Otherwise samples are held out at random.
    """
    rng = np.random.default_rng(seed + 7919)
    held_out = None
    domains = scenario.train.domain
    if scenario.unseen_test_domains and domains is not None and len(np.unique(domains)) >= 2:
        order = rng.permutation(np.unique(domains))
        n_dom = max(1, min(len(order) - 1, int(round(fraction * len(order)))))
        held_out = np.isin(domains, order[:n_dom])
    train_parts, val_parts, tasks, cursor = [], [], [], 0
    for task in scenario.tasks:
        if held_out is not None:
            val, fit = task.train_idx[held_out[task.train_idx]], task.train_idx[~held_out[task.train_idx]]
        else:
            idx = rng.permutation(task.train_idx)
            n_val = max(1, int(round(fraction * len(idx))))
            val, fit = np.sort(idx[:n_val]), np.sort(idx[n_val:])
        train_parts.append(fit)
        val_parts.append(val)
        tasks.append(Task(task.index, np.arange(cursor, cursor + len(fit)), val, task.classes, task.name))
        cursor += len(fit)
    fit_all = np.concatenate(train_parts)
    val_all = np.concatenate(val_parts)
    # validation samples are drawn from train: index them into a "test" set built from train
    offsets = np.cumsum([0] + [len(v) for v in val_parts])
    for t, task in enumerate(tasks):
        task.test_idx = np.arange(offsets[t], offsets[t + 1])
    return Scenario(f"{scenario.name} (validation)", scenario.setting, scenario.train.subset(fit_all),
                    scenario.train.subset(val_all), scenario.specs, tasks, scenario.class_names,
                    scenario.unseen_test_domains)


def scaled_specs(specs: dict[str, PreprocessSpec], first: MultiModalDataset) -> dict[str, PreprocessSpec]:
    """The specs with every ``vector`` modality's standardisation fitted on ``first`` (the first
    task's training samples that have it); specs already fitted stay as they are."""
    return {m: fit_vector_scaling(s, [first.samples[m][i] for i in np.flatnonzero(first.presence(m))])
            for m, s in specs.items()}
