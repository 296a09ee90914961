"""The learner's workspace: everything a device keeps between tasks that may arrive days apart.

    WS/workspace.json        data source + LearnConfig + workspace id (+ config changes per task)
    WS/taps/                 tap cache
    WS/state/task_NNN.*      model after task NNN (safetensors + JSON; no pickle)
    WS/report.json           accuracy matrix, summary metrics, per-task timings
    WS/backbones/, packs/, current   deployable artefacts (see mmcl_edge.export)

File names, atomic writes, pack versions, ``current`` and the lock: ``mmcl_edge.runtime.layout``.

One transaction per task: (1) the state is written (weights, then the JSON that commits it and
carries the task's report row), (2) the task's pack is published and made current, (3) the
report row is written. A task is done only when all three are on disk; ``recover`` (run by
learn, eval and export under the workspace lock) finishes an interrupted task from its committed
state, or rolls back a state that was never committed, and says which.
"""
from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Callable

from mmcl_edge.config import LearnConfig
from mmcl_edge.data import DataFormatError, Scenario, load_scenario
from mmcl_edge.learners import AdapterLearner
from mmcl_edge.metrics import summarise
from mmcl_edge.model import MMCLModel
from mmcl_edge.runtime import layout
from mmcl_edge.stream import TapSource, learn_one_task

FORMAT_VERSION = 1


from mmcl_edge.errors import MMCLError, WorkspaceError  # noqa: E402  (one hierarchy: mmcl_edge.errors)


def write_json_atomic(path: Path, obj) -> None:
    layout.atomic_write_json(path, obj)


# options that shape the saved model: they cannot change once a task is learned
FIXED_AFTER_FIRST_TASK = ("encoder.", "head", "fused_weight")


class Workspace:
    def __init__(self, root: Path, meta: dict):
        self.root = Path(root)
        self.meta = meta
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or "source" not in meta:
            raise WorkspaceError(f"{self.root / layout.WORKSPACE_FILE} is not a workspace description "
                                 "(no 'source' or 'config')")
        config = meta["config"]
        if isinstance(config.get("encoder"), dict) and "tap_rank" not in config["encoder"]:
            # a workspace from before 0.3 keeps full-rank tap projections: its saved states have them
            config = {**config, "encoder": {**config["encoder"], "tap_rank": 0}}
        self.config = LearnConfig.from_dict(config)
        self._scenario: Scenario | None = None
        self._source: TapSource | None = None
        self.log: Callable[[str], None] | None = None  # where recovery notes go (the CLI prints them)

    @property
    def workspace_id(self) -> str | None:
        return self.meta.get("workspace_id")

    def lock(self, what: str = "write"):
        """The workspace's exclusive write lock; a second writer fails at once (``WorkspaceLocked``)."""
        return layout.workspace_lock(self.root, what)

    # creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, root, source: dict, config: LearnConfig) -> "Workspace":
        root = Path(root).expanduser().resolve()
        if (root / "workspace.json").exists():
            raise WorkspaceError(f"{root} already holds a workspace")
        meta = {"format": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source,
                "config": config.to_dict(), "workspace_id": uuid.uuid4().hex}
        ws = cls(root, meta)
        ws.scenario()  # the data must load before a folder is bound to it: a bad source leaves nothing behind
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "workspace.json", meta)
        return ws

    @classmethod
    def open(cls, root) -> "Workspace":
        root = Path(root).expanduser().resolve()
        path = root / "workspace.json"
        if not path.is_file():
            raise WorkspaceError(f"{root} is not a workspace (no workspace.json); create one with 'mmcl-edge learn'")
        return cls(root, layout.read_json(path, "the workspace description"))

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

    def apply_overrides(self, overrides: dict) -> dict:
        """Options given to an existing workspace apply to the tasks not yet learned.

        They are recorded in workspace.json (``config_changes``: the task they start from and the
        values); options that shape the saved model (``encoder.*``, ``head``, ``fused_weight``)
        are refused once a task is learned. Returns the keys whose value changed.
        """
        current = _flatten(self.config.to_dict())
        changed = {}
        new = self.config.override(overrides)  # validates keys and values (ConfigError)
        flat = _flatten(new.to_dict())
        for key in overrides:
            if flat[key] != current[key]:
                changed[key] = flat[key]
        if not changed:
            return {}
        start = self.learned_tasks()
        fixed = [k for k in changed if k.startswith(FIXED_AFTER_FIRST_TASK)]
        if fixed and start > 0:
            raise WorkspaceError(f"{', '.join(fixed)} cannot change after a task is learned (the saved model's "
                                 f"shape depends on it); use a new --workspace")
        self.config = new
        self.meta["config"] = new.to_dict()
        self.meta.setdefault("config_changes", []).append({"from_task": start, "set": changed,
                                                          "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_json_atomic(self.root / layout.WORKSPACE_FILE, self.meta)
        return changed

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
        return layout.state_paths(self.root, k)

    def learned_tasks(self) -> int:
        return layout.committed_tasks(self.root)

    def load_model(self, k: int) -> MMCLModel:
        weights, meta = self.state_paths(k)
        if not weights.is_file() or not meta.is_file():
            raise WorkspaceError(f"task {k} has not been learned in {self.root}")
        layout.read_json(meta, f"the state of task {k}")
        try:
            return MMCLModel.load(weights, meta)[0]
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # safetensors / state-dict mismatch
            raise WorkspaceError(f"the saved state of task {k} ({weights}) cannot be loaded ({str(exc)[:200]}); "
                                 f"re-learn it with 'mmcl-edge learn --task {k} --force'") from None

    def save_state(self, k: int, model: MMCLModel, extra: dict) -> None:
        """Commit task ``k``'s state: weights first, then the JSON (written last, it commits the task)."""
        from safetensors.torch import save_file

        weights, meta = self.state_paths(k)
        tensors = model.state_tensors()
        layout.atomic_write(weights, lambda tmp: save_file(tensors, str(tmp)))
        write_json_atomic(meta, {**model.describe(), **extra})

    def drop_states(self, start: int, stop: int) -> None:
        for k in reversed(range(start, stop)):  # the commit record (JSON) goes first
            weights, meta = self.state_paths(k)
            meta.unlink(missing_ok=True)
            weights.unlink(missing_ok=True)

    def report(self) -> dict:
        path = self.root / layout.REPORT_FILE
        return layout.read_json(path, "the report") if path.is_file() else {"accuracy_matrix": [], "tasks": []}

    def write_report(self, report: dict) -> None:
        sc = self.scenario()
        report.update({"scenario": sc.name, "setting": sc.setting, "method": "mmcl",
                       "tasks_total": len(sc.tasks), "class_names": sc.class_names,
                       **summarise(report["accuracy_matrix"])})
        write_json_atomic(self.root / layout.REPORT_FILE, report)

    # recovery -------------------------------------------------------------------------------
    def serving_pack_matches(self, k: int) -> bool:
        """Does ``current`` name a pack of task ``k`` built from task ``k``'s committed state?"""
        from mmcl_edge.runtime.pack import MANIFEST_FILE, sha256_file

        try:
            folder = layout.current_folder(self.root)
            if folder is None:
                return False
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
        except (OSError, ValueError, MMCLError):
            return False
        if manifest.get("task") != k:
            return False
        want = manifest.get("state_sha256")
        return want is None or want == sha256_file(self.state_paths(k)[0])

    def recover(self) -> list[str]:
        """Finish or roll back a task an interrupted run left behind; returns what was done.

        Call with the lock held. Temporary files go; a state whose commit record (JSON) is missing
        is rolled back; a committed task whose pack or report row is missing is completed.
        """
        notes = []
        removed = layout.clean_temporaries(self.root)
        if removed:
            notes.append(f"removed {len(removed)} temporary file(s) an interrupted run left behind")
        done = self.learned_tasks()
        weights, meta = self.state_paths(done)
        if weights.exists() or meta.exists():
            weights.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            notes.append(f"task {done} was interrupted before its state was complete: rolled back "
                         "(it will be learned again)")
        report = self.report()
        rows = len(report["accuracy_matrix"])
        if rows > done:
            report["accuracy_matrix"] = report["accuracy_matrix"][:done]
            report["tasks"] = report["tasks"][:done]
            notes.append(f"report rows of tasks {done}..{rows - 1} had no saved state: dropped")
        if done and not self.serving_pack_matches(done - 1):
            from mmcl_edge.export.pack_export import publish_pack

            path = publish_pack(self, done - 1, self.load_model(done - 1))
            notes.append(f"task {done - 1} was learned but its pack was not published: published {path.name}")
        if rows < done:
            for k in range(rows, done):
                d = layout.read_json(self.state_paths(k)[1], f"the state of task {k}")
                if "report_row" not in d:
                    raise WorkspaceError(f"the report lacks task {k} and its state predates recovery records; "
                                         "run 'mmcl-edge eval' to recompute the report")
                report["accuracy_matrix"].append(d["report_row"])
                report["tasks"].append(d["report_record"])
            notes.append(f"report rows of task(s) {rows}..{done - 1} were missing: completed from the saved states")
        if rows != done:
            self.write_report(report)
        for note in notes:
            if self.log:
                self.log(note)
        return notes

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
        with self.lock("learn"):
            recovered = self.recover()
            return self._learn(task, force, progress, on_task, bool(recovered))

    def _learn(self, task, force, progress, on_task, recovered: bool) -> dict:
        sc = self.scenario()
        n_tasks, done = len(sc.tasks), self.learned_tasks()
        if task is None:
            todo = list(range(done, n_tasks))
            if not todo:
                if recovered:
                    return self.report()
                raise WorkspaceError(f"all {n_tasks} tasks are already learned in {self.root}; use "
                                     "'mmcl-edge eval' to evaluate, or a new --workspace to start over")
        else:
            if not 0 <= task < n_tasks:
                raise WorkspaceError(f"--task {task} is out of range: this stream has tasks 0..{n_tasks - 1}")
            if task > done:
                raise WorkspaceError(f"task {task} needs tasks 0..{task - 1} first; next to learn is task {done}")
            if task < done and not force:
                if recovered and task == done - 1:
                    return self.report()
                raise WorkspaceError(f"task {task} is already learned; --force re-learns it and discards "
                                     f"the states of tasks {task}..{done - 1}")
            todo = [task]
        src = self.tap_source(progress)
        report = self.report()
        start = todo[0]
        self.drop_states(start, done)  # --force: later states no longer follow from the new one
        report["accuracy_matrix"] = report["accuracy_matrix"][:start]
        report["tasks"] = report["tasks"][:start]
        learner = self.learner_at(start)
        for k in todo:
            row, record = learn_one_task(sc, learner, src, k)
            # (1) commit the state, with the report row it produced (what recovery needs)
            self.save_state(k, learner.model, {
                "task": k, "classes_seen": sc.classes_seen(k) if sc.setting == "class-il" else list(range(sc.num_classes)),
                "report_row": row, "report_record": record})
            # (2) publish the pack and make it current, (3) the report row
            self.after_task(k, learner.model)
            report["accuracy_matrix"].append(row)
            report["tasks"].append(record)
            self.write_report(report)
            if on_task:
                on_task(k, row, record)
        return self.report()

    def after_task(self, k: int, model: MMCLModel) -> None:
        """Hook: publish the task's pack (overridden/extended by the export layer)."""
        from mmcl_edge.export.pack_export import publish_pack

        publish_pack(self, k, model)

    def evaluate(self, progress: Callable | None = None) -> dict:
        """Recompute the whole accuracy matrix from the saved per-task states."""
        with self.lock("eval"):
            self.recover()
            return self._evaluate(progress)

    def _evaluate(self, progress: Callable | None = None) -> dict:
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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


__all__ = ["Workspace", "WorkspaceError", "DataFormatError"]
