"""The learner's workspace: everything a device keeps between tasks that may arrive days apart.

    WS/workspace.json        data source + LearnConfig (written once, at creation)
    WS/taps/                 tap cache
    WS/state/task_NNN.*      model after task NNN (safetensors + JSON; no pickle)
    WS/report.json           accuracy matrix, summary metrics, per-task timings
    WS/backbones/, packs/, current   deployable artefacts (see mmcl_edge.export)
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Callable

from mmcl_edge.config import LearnConfig
from mmcl_edge.data import DataFormatError, Scenario, load_scenario
from mmcl_edge.learners import AdapterLearner
from mmcl_edge.metrics import summarise
from mmcl_edge.model import MMCLModel
from mmcl_edge.stream import TapSource, learn_one_task

FORMAT_VERSION = 1


class WorkspaceError(RuntimeError):
    """A workspace cannot be used as asked; the message says why and what to do."""


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


class Workspace:
    def __init__(self, root: Path, meta: dict):
        self.root = Path(root)
        self.meta = meta
        self.config = LearnConfig.from_dict(meta["config"])
        self._scenario: Scenario | None = None
        self._source: TapSource | None = None

    # creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, root, source: dict, config: LearnConfig) -> "Workspace":
        root = Path(root).expanduser().resolve()
        if (root / "workspace.json").exists():
            raise WorkspaceError(f"{root} already holds a workspace")
        root.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source,
                "config": config.to_dict()}
        write_json_atomic(root / "workspace.json", meta)
        return cls(root, meta)

    @classmethod
    def open(cls, root) -> "Workspace":
        root = Path(root).expanduser().resolve()
        path = root / "workspace.json"
        if not path.is_file():
            raise WorkspaceError(f"{root} is not a workspace (no workspace.json); create one with 'mmcl-edge learn'")
        return cls(root, json.loads(path.read_text()))

    @classmethod
    def open_or_create(cls, root, source: dict, config: LearnConfig) -> "Workspace":
        root = Path(root).expanduser()
        if (root / "workspace.json").is_file():
            ws = cls.open(root)
            ws.check_source(source)
            return ws
        return cls.create(root, source, config)

    def check_source(self, source: dict) -> None:
        mine = self.meta["source"]
        for key in ("scenario", "data", "setting", "classes_per_task", "seed"):
            if source.get(key) is not None and mine.get(key) != source.get(key):
                raise WorkspaceError(f"workspace {self.root} was created with {key}={mine.get(key)!r}, not "
                                     f"{source.get(key)!r}; use another --workspace for other data")
        if source.get("data_dir"):
            self.meta["source"]["data_dir"] = source["data_dir"]  # the data may move, the task stream not

    # data -----------------------------------------------------------------------------------
    def scenario(self) -> Scenario:
        if self._scenario is None:
            s = self.meta["source"]
            self._scenario = load_scenario(s.get("scenario"), data=s.get("data"), data_dir=s.get("data_dir"),
                                           setting=s.get("setting") or "class-il",
                                           classes_per_task=s.get("classes_per_task") or 2, seed=s.get("seed") or 0)
        return self._scenario

    def tap_source(self, progress: Callable | None = None) -> TapSource:
        if self._source is None:
            self._source = TapSource(self.scenario(), self.root / "taps", progress)
        self._source.progress = progress
        return self._source

    # state ----------------------------------------------------------------------------------
    def state_paths(self, k: int) -> tuple[Path, Path]:
        d = self.root / "state"
        return d / f"task_{k:03d}.safetensors", d / f"task_{k:03d}.json"

    def learned_tasks(self) -> int:
        k = 0
        while all(p.is_file() for p in self.state_paths(k)):
            k += 1
        return k

    def load_model(self, k: int) -> MMCLModel:
        weights, meta = self.state_paths(k)
        if not weights.is_file():
            raise WorkspaceError(f"task {k} has not been learned in {self.root}")
        return MMCLModel.load(weights, meta)[0]

    def report(self) -> dict:
        path = self.root / "report.json"
        return json.loads(path.read_text()) if path.is_file() else {"accuracy_matrix": [], "tasks": []}

    def write_report(self, report: dict) -> None:
        sc = self.scenario()
        report.update({"scenario": sc.name, "setting": sc.setting, "method": "mmcl",
                       "tasks_total": len(sc.tasks), "class_names": sc.class_names,
                       **summarise(report["accuracy_matrix"])})
        write_json_atomic(self.root / "report.json", report)

    # learning -------------------------------------------------------------------------------
    def learner_at(self, k: int) -> AdapterLearner:
        """A learner whose model is the one after task ``k - 1`` (fresh when ``k == 0``)."""
        sc, src = self.scenario(), self.tap_source()
        if k == 0:
            return AdapterLearner(self.config, src.modality_taps, sc.setting, sc.num_classes)
        model = self.load_model(k - 1)
        learner = AdapterLearner(self.config, src.modality_taps, sc.setting, sc.num_classes, model=model)
        learner.old = copy.deepcopy(model).eval()
        for p in learner.old.parameters():
            p.requires_grad_(False)
        return learner

    def learn(self, task: int | None = None, force: bool = False, progress: Callable | None = None,
              on_task: Callable | None = None) -> dict:
        """Learn one task (``task``) or every remaining task; returns the updated report."""
        sc = self.scenario()
        n_tasks, done = len(sc.tasks), self.learned_tasks()
        if task is None:
            todo = list(range(done, n_tasks))
            if not todo:
                raise WorkspaceError(f"all {n_tasks} tasks are already learned in {self.root}; use "
                                     "'mmcl-edge eval' to evaluate, or a new --workspace to start over")
        else:
            if not 0 <= task < n_tasks:
                raise WorkspaceError(f"--task {task} is out of range: this stream has tasks 0..{n_tasks - 1}")
            if task > done:
                raise WorkspaceError(f"task {task} needs tasks 0..{task - 1} first; next to learn is task {done}")
            if task < done and not force:
                raise WorkspaceError(f"task {task} is already learned; --force re-learns it and discards "
                                     f"the states of tasks {task}..{done - 1}")
            todo = [task]
        src = self.tap_source(progress)
        report = self.report()
        start = todo[0]
        for k in range(start, done):  # --force: later states no longer follow from the new one
            for p in self.state_paths(k):
                p.unlink(missing_ok=True)
        report["accuracy_matrix"] = report["accuracy_matrix"][:start]
        report["tasks"] = report["tasks"][:start]
        learner = self.learner_at(start)
        for k in todo:
            row, record = learn_one_task(sc, learner, src, k)
            weights, meta = self.state_paths(k)
            weights.parent.mkdir(parents=True, exist_ok=True)
            learner.model.save(weights, meta, {"task": k, "classes_seen": sc.classes_seen(k) if sc.setting == "class-il"
                                               else list(range(sc.num_classes))})
            report["accuracy_matrix"].append(row)
            report["tasks"].append(record)
            self.write_report(report)
            self.after_task(k, learner.model)
            if on_task:
                on_task(k, row, record)
        return self.report()

    def after_task(self, k: int, model: MMCLModel) -> None:
        """Hook: publish the task's pack (overridden/extended by the export layer)."""
        from mmcl_edge.export.pack_export import publish_pack

        publish_pack(self, k, model)

    def evaluate(self, progress: Callable | None = None) -> dict:
        """Recompute the whole accuracy matrix from the saved per-task states."""
        sc, src = self.scenario(), self.tap_source(progress)
        from mmcl_edge.stream import label_map

        done = self.learned_tasks()
        if done == 0:
            raise WorkspaceError(f"nothing learned yet in {self.root}; run 'mmcl-edge learn' first")
        matrix = []
        for k in range(done):
            learner = AdapterLearner(self.config, src.modality_taps, sc.setting, sc.num_classes, model=self.load_model(k))
            row = []
            for j, other in enumerate(sc.tasks):
                if sc.setting == "class-il" and j > k:
                    row.append(None)
                    continue
                test, _, _ = src.taps("test", other.test_idx, label_map(sc, max(j, k)), f"task {j} test")
                row.append(float((learner.predict(test) == test.y).mean()) if len(test) else None)
            matrix.append(row)
        report = self.report()
        report["accuracy_matrix"] = matrix
        report["evaluated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write_report(report)
        return self.report()


__all__ = ["Workspace", "WorkspaceError", "DataFormatError"]
