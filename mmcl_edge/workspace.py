"""The learner's workspace: an append-only log of the tasks a device was taught, days apart.

    WS/workspace.json        modalities, LearnConfig, workspace id, data source of a benchmark
                             stream (+ config changes per task)
    WS/taps/                 tap cache
    WS/heldout/task_NNN.npz  task NNN's held-out data, as taps with class names
    WS/state/task_NNN.*      model after task NNN (safetensors + JSON: the task's commit record,
                             with its origin, class names, accuracy row and gate decision)
    WS/report.json           accuracy matrix, summary metrics, per-task timings, refused tasks
    WS/backbones/, packs/, current   deployable artefacts (see mmcl_edge.export)

Every task, whatever produced it (a data folder, a robot's bag, the service's inbox, a benchmark
scenario, ``Workspace.teach``), goes through ``learn_task``: class names map to head indices
(new names grow the head), the task is learned, its pack must pass the forgetting gate on the
held-out data of earlier tasks, and only then is it committed and published.

File names, atomic writes, pack versions, ``current`` and the lock: ``mmcl_edge.runtime.layout``.

One transaction per task: (1) the state is written (weights, then the JSON that commits it and
carries the task's report row), (2) the task's pack is published and made current, (3) the
report row is written. A task is done only when all three are on disk; ``recover`` (run by
learn, eval and export under the workspace lock) finishes an interrupted task from its committed
state, or rolls back a state that was never committed, and says which.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Callable

from mmcl_edge.config import LearnConfig
import numpy as np

from mmcl_edge.data import DataFormatError, MultiModalDataset, Scenario, load_scenario
from mmcl_edge.data.dataset import scaled_specs
from mmcl_edge.data.dataset import TaskInput, scenario_task
from mmcl_edge.learners.base import TaskData
from mmcl_edge.preprocess import PreprocessSpec, preprocess, unfitted
from mmcl_edge.learners import AdapterLearner
from mmcl_edge.metrics import summarise
from mmcl_edge.model import MMCLModel
from mmcl_edge.runtime import layout
from mmcl_edge.runtime import memory
from mmcl_edge.stream import (TapSource, accuracy_row, add_classes, learn_one_task, scenario_classes, square,
                              start_task_peak, task_peak, task_taps)

FORMAT_VERSION = 2  # 2: modalities and input shapes kept (a workspace may be taught with no data set)
DEFAULT_MAX_FORGETTING = 5.0  # points of accuracy on earlier held-out data a new pack may lose


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
        self._learner: tuple[int, AdapterLearner] | None = None  # (tasks it has learned, learner)
        self.log: Callable[[str], None] | None = None  # where recovery notes go (the CLI prints them)

    @property
    def workspace_id(self) -> str | None:
        return self.meta.get("workspace_id")

    @property
    def taught(self) -> bool:
        """True for a workspace taught task by task (``teach``), with no benchmark stream behind it."""
        return bool(self.meta["source"].get("taught"))

    def lock(self, what: str = "write"):
        """The workspace's exclusive write lock; a second writer fails at once (``WorkspaceLocked``)."""
        return layout.workspace_lock(self.root, what)

    # creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, root, source: dict, config: LearnConfig) -> "Workspace":
        """A workspace bound to a benchmark stream or a data set cut into tasks (``learn``)."""
        root = layout.resolve_root(root)
        if (root / "workspace.json").exists():
            raise WorkspaceError(f"{root} already holds a workspace")
        meta = cls._new_meta(source, config)
        ws = cls(root, meta)
        sc = ws.scenario()  # the data must load before a folder is bound to it: a bad source leaves nothing behind
        meta.update(modality_description(sc.specs, sc.train), setting=sc.setting)
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "workspace.json", meta)
        return ws

    @classmethod
    def create_taught(cls, root, specs: dict[str, PreprocessSpec], first: MultiModalDataset,
                      config: LearnConfig) -> "Workspace":
        """An empty workspace for tasks that arrive one by one; its modalities come from the first."""
        root = layout.resolve_root(root)
        if (root / "workspace.json").exists():
            raise WorkspaceError(f"{root} already holds a workspace")
        meta = cls._new_meta({"taught": True}, config)
        meta.update(modality_description(specs, first), setting="class-il")
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "workspace.json", meta)
        return cls(root, meta)

    @staticmethod
    def _new_meta(source: dict, config: LearnConfig) -> dict:
        return {"format": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source,
                "config": config.to_dict(), "workspace_id": uuid.uuid4().hex}

    @classmethod
    def open(cls, root) -> "Workspace":
        root = layout.resolve_root(root)
        path = root / "workspace.json"
        if not path.is_file():
            raise WorkspaceError(f"{root} is not a workspace (no workspace.json); create one with "
                                 "'mmcl-edge teach' or 'mmcl-edge learn'")
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
        if self.taught:
            raise WorkspaceError(f"workspace {self.root} is taught task by task; give it a task with "
                                 "'mmcl-edge teach -w WS DIR', or use another --workspace for a benchmark stream")
        for key in ("scenario", "data", "setting", "classes_per_task", "seed"):
            if source.get(key) is not None and mine.get(key) != source.get(key):
                raise WorkspaceError(f"workspace {self.root} was created with {key}={mine.get(key)!r}, not "
                                     f"{source.get(key)!r}; use another --workspace for other data, or "
                                     "'mmcl-edge teach -w WS DIR' to teach it a task from a folder")
        if source.get("data_dir"):
            self.meta["source"]["data_dir"] = source["data_dir"]  # the data may move, the task stream not

    def check_modalities(self, specs: dict[str, PreprocessSpec], where: str) -> None:
        """A new task must bring the modalities the workspace was created with, with the same options."""
        mine = self.specs
        if set(specs) != set(mine):
            raise DataFormatError(f"{where} has modalities {', '.join(sorted(specs))} but workspace {self.root} "
                                  f"has {', '.join(sorted(mine))}")
        for m, spec in specs.items():  # statistics the workspace fitted on its first task are its own
            a, b = unfitted(mine[m]).to_dict(), unfitted(spec).to_dict()
            diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            if diff:
                k = diff[0]
                raise DataFormatError(f"modality {m!r} in {where} has {k}={b.get(k)!r}, but the workspace has "
                                      f"{k}={a.get(k)!r}: a task must keep the workspace's kinds and options")

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
        self._learner = None
        return changed

    # data -----------------------------------------------------------------------------------
    def scenario(self) -> Scenario:
        """The benchmark stream or data set this workspace was created from (not for a taught one)."""
        if self.taught:
            raise WorkspaceError(f"workspace {self.root} was taught task by task and keeps no data set; "
                                 "this needs a workspace made by 'mmcl-edge learn'")
        if self._scenario is None:
            s = self.meta["source"]
            self._scenario = load_scenario(s.get("scenario"), data=s.get("data"), data_dir=s.get("data_dir"),
                                           setting=s.get("setting") or "class-il",
                                           classes_per_task=s.get("classes_per_task") or 2, seed=s.get("seed") or 0)
        return self._scenario

    @property
    def specs(self) -> dict[str, PreprocessSpec]:
        if "modalities" in self.meta:
            return {m: PreprocessSpec.from_dict(d) for m, d in self.meta["modalities"].items()}
        return self.scenario().specs  # a workspace from before 0.4

    @property
    def setting(self) -> str:
        return self.meta.get("setting") or self.scenario().setting

    def tap_source(self, progress: Callable | None = None) -> TapSource:
        if self._source is None:
            if "input_shapes" in self.meta:
                self._source = TapSource.for_specs(self.specs, {m: tuple(s) for m, s in self.meta["input_shapes"].items()},
                                                   self.root / "taps")
                if not self.taught:
                    self._source.scenario_loader = self.scenario  # loaded only if its samples are asked for
            else:
                self._source = TapSource(self.scenario(), self.root / "taps")
        self._source.progress = progress
        return self._source

    def class_names(self, k: int | None = None) -> list[str]:
        """The head's classes, in head order, after task ``k`` (default: the last learned)."""
        k = self.learned_tasks() - 1 if k is None else k
        if k < 0:
            return [] if self.setting == "class-il" else scenario_classes(self.scenario())
        d = layout.read_json(self.state_paths(k)[1], f"the state of task {k}")
        if "class_names" in d:
            return list(d["class_names"])
        sc = self.scenario()  # a state from before 0.4 lists the scenario's label indices
        return [sc.class_names[c] for c in d["classes_seen"]]

    def heldout(self, k: int) -> TaskData | None:
        """Task ``k``'s held-out taps, labelled with head indices (None: the task kept none)."""
        path = layout.heldout_path(self.root, k)
        if not path.is_file():
            if self.taught or "modalities" in self.meta:
                return None
            # a workspace from before 0.4: its tasks' held-out data is the scenario's test split
            task = scenario_task(self.scenario(), k)
            return task_taps(self.tap_source(), task, self.class_names(k))[1]
        index = {n: i for i, n in enumerate(self.class_names())}
        return load_taskdata(path, list(self.specs), index)

    # state ----------------------------------------------------------------------------------
    def state_paths(self, k: int) -> tuple[Path, Path]:
        return layout.state_paths(self.root, k)

    def learned_tasks(self) -> int:
        return layout.committed_tasks(self.root)

    def task_record(self, k: int) -> dict:
        """Task ``k``'s commit record: origin, class names, accuracy row, gate decision."""
        return layout.read_json(self.state_paths(k)[1], f"the state of task {k}")

    def load_model(self, k: int) -> MMCLModel:
        weights, meta = self.state_paths(k)
        if not weights.is_file() or not meta.is_file():
            raise WorkspaceError(f"task {k} has not been learned in {self.root}")
        layout.read_json(meta, f"the state of task {k}")
        try:
            return MMCLModel.load(weights, meta)[0]
        except PermissionError as exc:
            raise WorkspaceError(f"cannot read {exc.filename or weights}: permission denied") from None
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # safetensors / state-dict mismatch
            raise WorkspaceError(f"the saved state of task {k} ({weights}) cannot be loaded ({str(exc)[:200]}); "
                                 f"re-learn it with 'mmcl-edge learn --task {k} --force'") from None

    def save_state(self, k: int, model: MMCLModel, extra: dict) -> None:
        """Commit task ``k``'s state: weights first, then the JSON (written last, it commits the task)."""
        from mmcl_edge.state_file import write_state

        weights, meta = self.state_paths(k)
        # streamed by Python: a refused write is an OSError that names the file (safetensors' own
        # save_file raises a SafetensorError without errno or path), and no second copy is built
        write_state(weights, model.state_dict())
        write_json_atomic(meta, {**model.describe(), **extra})

    def drop_states(self, start: int, stop: int) -> None:
        for k in reversed(range(start, stop)):  # the commit record (JSON) goes first
            weights, meta = self.state_paths(k)
            meta.unlink(missing_ok=True)
            weights.unlink(missing_ok=True)
            layout.heldout_path(self.root, k).unlink(missing_ok=True)

    def report(self) -> dict:
        path = self.root / layout.REPORT_FILE
        return layout.read_json(path, "the report") if path.is_file() else {"accuracy_matrix": [], "tasks": []}

    def write_report(self, report: dict) -> None:
        report["accuracy_matrix"] = square(report["accuracy_matrix"])
        if self.taught:
            report.update({"scenario": "taught", "setting": self.setting})
        else:
            sc = self.scenario()
            report.update({"scenario": sc.name, "setting": sc.setting, "tasks_total": len(sc.tasks)})
        report.update({"method": "mmcl", "class_names": self.class_names(), **summarise(report["accuracy_matrix"])})
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
        is rolled back, with its held-out data; a committed task whose pack or report row is
        missing is completed.
        """
        notes = []
        removed = layout.clean_temporaries(self.root)
        if removed:
            notes.append(f"removed {len(removed)} temporary file(s) an interrupted run left behind")
        done = self.learned_tasks()
        weights, meta = self.state_paths(done)
        heldout = layout.heldout_path(self.root, done)
        if weights.exists() or meta.exists() or heldout.exists():
            weights.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            heldout.unlink(missing_ok=True)
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
                d = self.task_record(k)
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
        if self._learner is not None and self._learner[0] == k:
            return self._learner[1]
        src = self.tap_source()
        # a benchmark stream sizes the ridge head for all its classes up front (as states before 0.4
        # were saved); a taught workspace grows it class by class
        n_classes = 0 if self.taught else len(self.scenario().class_names)
        if k == 0:
            return AdapterLearner(self.config, src.modality_taps, self.setting, n_classes)
        model = self.load_model(k - 1)
        learner = AdapterLearner(self.config, src.modality_taps, self.setting, n_classes, model=model)
        learner.old = model.teacher()
        return learner

    def learn(self, task: int | None = None, force: bool = False, progress: Callable | None = None,
              on_task: Callable | None = None, max_forgetting: float | None = DEFAULT_MAX_FORGETTING) -> dict:
        """Learn one task (``task``) or every remaining task of the workspace's stream; returns the
        updated report. Each task goes through ``learn_task``, as a taught one does."""
        with self.lock("learn"):
            recovered = self.recover()
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
            self.discard_from(todo[0])
            for k in todo:
                result = self._learn_task(scenario_task(sc, k), progress, max_forgetting, force)
                if result["status"] != "published":
                    raise TaskRefused(result)
                if on_task:
                    on_task(k, result["row"], result["record"])
            return self.report()

    def discard_from(self, start: int) -> None:
        """``--force``: tasks ``start``.. are learned again; later states no longer follow from them."""
        done = self.learned_tasks()
        if start >= done:
            return
        self.drop_states(start, done)
        report = self.report()
        report["accuracy_matrix"] = [row[:start] for row in report["accuracy_matrix"][:start]]
        report["tasks"] = report["tasks"][:start]
        self.write_report(report)
        self._learner = None

    def learn_task(self, task: TaskInput, progress: Callable | None = None,
                   max_forgetting: float | None = DEFAULT_MAX_FORGETTING, force: bool = False) -> dict:
        """Learn one task as the next in the log; publish its pack unless the forgetting gate refuses it.

        Returns ``{"status": "published" | "refused", "task": k, "row": [...], "record": {...},
        "gate": {...}, "pack": name}``. ``force`` publishes a task the gate refused.
        """
        with self.lock("teach"):
            self.recover()
            return self._learn_task(task, progress, max_forgetting, force)

    def teach(self, samples: dict[str, list], labels: list[str], heldout: tuple[dict, list[str]] | None = None,
              max_forgetting: float | None = DEFAULT_MAX_FORGETTING, force: bool = False,
              origin: dict | None = None) -> dict:
        """Learn labelled samples as one task: ``samples`` = {modality: [arrays]} (None for a sample
        that lacks the modality), ``labels`` = class names. A name the workspace has not seen is a new
        class; a known one adds samples of it. ``heldout``: (samples, labels) kept to test this and
        later tasks. The pipeline's verb; the CLI's ``teach`` and the service's inbox come here too."""
        task = task_from_samples(samples, labels, heldout, self.specs, origin or {"api": True})
        return self.learn_task(task, max_forgetting=max_forgetting, force=force)

    def _learn_task(self, task: TaskInput, progress, max_forgetting, force) -> dict:
        k = self.learned_tasks()
        before = self.class_names()
        classes = add_classes(before, task)
        if self.setting == "domain-il" and len(classes) != len(before):
            new = [c for c in classes if c not in before]
            raise DataFormatError(f"class(es) {', '.join(new)} are new, but this workspace learns new conditions "
                                  f"of a fixed label set ({', '.join(before)})")
        src = self.tap_source(progress)
        if k == 0:
            self.export_backbones(src)
        per_task = start_task_peak()  # the task's peak: its taps, learning and pack (report.json)
        train, held, extract_s, extracted = task_taps(src, task, classes, f"task {k}")
        src.release_backbones()  # built again only to be checked against their export (publish_pack)
        memory.release()  # the backbones and their activations: freed, but glibc's heap would keep them
        heldouts = [self.heldout(j) for j in range(k)] + [held]
        learner = self.learner_at(k)
        self._learner = None  # it is about to change: a refused task must not leave it half-taught
        earlier = [(j, h) for j, h in enumerate(heldouts[:k]) if h is not None and len(h)]
        prev_pred = {j: learner.predict(h) for j, h in earlier} if k else {}
        row, info = learn_one_task(learner, k, train, len(classes), heldouts, per_task)
        gate = forgetting_gate(learner, earlier, prev_pred, classes, max_forgetting)
        calibrate_novelty(learner, heldouts, self.config.novelty.false_alarm)
        record = {"index": k, "name": task.name or f"task {k}", "classes": [task.names[int(c)] for c in np.unique(task.train.y)],
                  "classes_added": classes[len(before):], "samples_per_class": task.samples_per_class(),
                  "heldout_samples": 0 if held is None else int(len(held)), "origin": task.origin,
                  "extract_seconds": extract_s, "samples_extracted": extracted, **info, "gate": gate}
        if gate["refused"] and not force:
            report = self.report()
            report.setdefault("refused", []).append({**record, "row": row,
                                                      "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self.write_report(report)
            return {"status": "refused", "task": k, "row": row, "record": record, "gate": gate,
                    "reason": gate["reason"]}
        if gate["refused"]:
            gate["forced"] = True
        # (0) the held-out data, (1) the state that commits the task, with its report row
        if held is not None:
            save_taskdata(layout.heldout_path(self.root, k), held, list(self.specs), classes)
        self.save_state(k, learner.model, {
            "task": k, "class_names": classes, "origin": task.origin, "report_row": row, "report_record": record})
        # (2) the pack, made current, (3) the report row
        pack = self.after_task(k, learner.model)
        record.update(task_peak(per_task))  # now with the pack's export (the state keeps the peak before it)
        src.release_backbones()
        memory.release()
        report = self.report()
        report["accuracy_matrix"] = report["accuracy_matrix"][:k] + [row]
        report["tasks"] = report["tasks"][:k] + [record]
        self.write_report(report)
        self._learner = (k + 1, learner)
        return {"status": "published", "task": k, "row": row, "record": record, "gate": gate,
                "pack": None if pack is None else Path(pack).name}

    def export_backbones(self, src: TapSource) -> None:
        """Hook: export the backbones to ONNX unless done (the export layer's), before a workspace's
        first task, while the learner is small. At the first pack instead, the export's child process
        (540 MB on AV-Digits, 820 MB with text) ran beside a learner that had extracted and learned:
        1.0-1.1 GB together."""
        from mmcl_edge.export.backbone_export import ensure_backbones

        ensure_backbones(self.root / "backbones", src.backbones, self.specs)

    def after_task(self, k: int, model: MMCLModel):
        """Hook: publish the task's pack (overridden/extended by the export layer); returns its folder."""
        from mmcl_edge.export.pack_export import publish_pack

        return publish_pack(self, k, model)

    def evaluate(self, progress: Callable | None = None) -> dict:
        """Recompute the whole accuracy matrix from the saved per-task states and held-out data."""
        with self.lock("eval"):
            self.recover()
            return self._evaluate(progress)

    def _evaluate(self, progress: Callable | None = None) -> dict:
        src = self.tap_source(progress)
        done = self.learned_tasks()
        if done == 0:
            raise WorkspaceError(f"nothing learned yet in {self.root}; run 'mmcl-edge teach' or 'learn' first")
        heldouts = [self.heldout(j) for j in range(done)]
        matrix = []
        for k in range(done):
            learner = AdapterLearner(self.config, src.modality_taps, self.setting, 0, model=self.load_model(k))
            matrix.append(accuracy_row(learner, heldouts[: k + 1]))
        report = self.report()
        report["accuracy_matrix"] = matrix
        report["evaluated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write_report(report)
        return self.report()


class TaskRefused(MMCLError):
    """The forgetting gate refused a task of a benchmark stream: the stream stops there."""

    def __init__(self, result: dict):
        self.result = result
        super().__init__(f"task {result['task']} was refused: {result.get('reason')}; the previous pack keeps "
                         "serving (--max-forgetting to allow more, or --force)")


def forgetting_gate(learner, earlier: list[tuple[int, TaskData]], prev_pred: dict[int, np.ndarray],
                    classes: list[str], max_forgetting: float | None) -> dict:
    """Accuracy on the held-out data of earlier tasks before vs after this task, per class.

    Refused when the accuracy over those samples drops by more than ``max_forgetting`` points and the
    drop is more than chance on that many samples (McNemar, one-sided p < 0.05; None: the gate only
    measures)."""
    if not earlier:
        return {"refused": False, "measured_on": 0, "max_forgetting": max_forgetting}
    ys = np.concatenate([h.y for _, h in earlier])
    old = np.concatenate([prev_pred[j] == h.y for j, h in earlier])
    new = np.concatenate([learner.predict(h) == h.y for _, h in earlier])
    drop = 100.0 * (old.mean() - new.mean())
    per_class = {classes[c]: {"before": float(old[ys == c].mean()), "after": float(new[ys == c].mean())}
                 for c in np.unique(ys)}
    # the same samples before and after: McNemar's exact test on those that flipped tells a real
    # loss from a few samples' noise (on 40 held-out samples one flip is 2.5 points)
    lost, gained = int(np.sum(old & ~new)), int(np.sum(~old & new))
    p_value = mcnemar_one_sided(lost, gained)
    refused = max_forgetting is not None and drop > max_forgetting + 1e-9 and p_value < GATE_SIGNIFICANCE
    gate = {"refused": bool(refused), "measured_on": int(len(ys)), "accuracy_before": float(old.mean()),
            "accuracy_after": float(new.mean()), "drop_points": float(drop), "max_forgetting": max_forgetting,
            "samples_lost": lost, "samples_gained": gained, "p_value": p_value, "per_class": per_class}
    if refused:
        worst = sorted(per_class.items(), key=lambda kv: kv[1]["after"] - kv[1]["before"])[:3]
        gate["reason"] = (f"accuracy on earlier classes would drop by {drop:.1f} points "
                          f"({100 * old.mean():.1f}% -> {100 * new.mean():.1f}%, limit {max_forgetting:g}); most hurt: "
                          + ", ".join(f"{n} {100 * v['before']:.0f}->{100 * v['after']:.0f}%" for n, v in worst))
    return gate


GATE_SIGNIFICANCE = 0.05


def calibrate_novelty(learner, heldouts: list[TaskData | None], false_alarm: float) -> None:
    """Set the "unknown" threshold from every held-out sample kept so far (mmcl_edge/novelty.py)."""
    import torch

    from mmcl_edge.novelty import novelty_from_logits

    kept = [h for h in heldouts if h is not None and len(h)]
    if not kept or getattr(learner.model, "analytic", None) is None:
        return
    scores = torch.cat([novelty_from_logits(torch.from_numpy(learner.logits(h))) for h in kept])
    learner.model.novelty.set_from_heldout(scores, false_alarm)


def mcnemar_one_sided(lost: int, gained: int) -> float:
    """P(at least ``lost`` of the ``lost + gained`` flipped samples went wrong) if a flip were a coin toss."""
    import math

    n = lost + gained
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, i) for i in range(lost, n + 1)) / 2 ** n)


def modality_description(specs: dict[str, PreprocessSpec], first: MultiModalDataset) -> dict:
    """What a workspace keeps of its modalities: options, and each backbone's input shape (read off
    one preprocessed sample), so it can build its backbones with no data set at hand."""
    specs = scaled_specs(specs, first)  # vectors: standardised with the first task's statistics
    shapes = {}
    for m, spec in specs.items():
        rows = np.flatnonzero(first.presence(m))
        if not len(rows):
            raise DataFormatError(f"no sample of the first task has the modality {m!r}: nothing tells its shape")
        shapes[m] = list(preprocess(first.samples[m][rows[0]], spec).shape)
    return {"modalities": {m: s.to_dict() for m, s in specs.items()}, "input_shapes": shapes}


def task_from_samples(samples: dict[str, list], labels: list[str], heldout, specs: dict[str, PreprocessSpec],
                      origin: dict, name: str = "") -> TaskInput:
    """A TaskInput from in-memory samples labelled by class name (``None`` marks an absent modality)."""
    def dataset(samples, labels, names):
        labels = [str(n) for n in labels]
        n = len(labels)
        if n == 0:
            raise DataFormatError("a task needs at least one labelled sample")
        unknown = sorted(set(samples) - set(specs))
        if unknown:
            raise DataFormatError(f"unknown modality {', '.join(unknown)}; this workspace has {', '.join(specs)}")
        out, present = {}, {}
        for m in specs:
            xs = list(samples.get(m) or [None] * n)
            if len(xs) != n:
                raise DataFormatError(f"{len(xs)} samples of {m!r} for {n} labels")
            mask = np.array([x is not None for x in xs])
            fill = next((np.asarray(x) for x in xs if x is not None), np.zeros(1, np.float32))
            out[m] = [np.asarray(x) if x is not None else fill for x in xs]
            present[m] = mask
        if not np.any(np.stack(list(present.values())), axis=0).all():
            raise DataFormatError("every sample needs at least one modality")
        y = np.array([names.setdefault(lbl, len(names)) for lbl in labels])
        return MultiModalDataset(out, y, None, present)

    names: dict[str, int] = {}
    train = dataset(samples, labels, names)
    held = dataset(heldout[0], heldout[1], names) if heldout is not None else None
    return TaskInput(train, list(names), held, origin, name)


def save_taskdata(path: Path, data: TaskData, modalities: list[str], classes: list[str]) -> None:
    """A task's held-out taps and class names, written atomically (this module owns the format)."""
    arrays = {f"tap__{m}__{i}": t for m in modalities for i, t in enumerate(data.taps[m])}
    arrays["present"] = data.presence()
    arrays["labels"] = np.array([classes[int(c)] for c in data.y], dtype=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout.atomic_write(path, lambda tmp: _savez(tmp, arrays))


def _savez(tmp: Path, arrays: dict) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_taskdata(path: Path, modalities: list[str], index: dict[str, int]) -> TaskData:
    try:
        with np.load(path, allow_pickle=False) as z:
            taps = {m: [z[f"tap__{m}__{i}"] for i in range(sum(1 for k in z.files if k.startswith(f"tap__{m}__")))]
                    for m in modalities}
            present, labels = z["present"], z["labels"]
    except PermissionError:
        raise WorkspaceError(f"cannot read {path}: permission denied") from None
    except (OSError, ValueError, KeyError) as exc:
        raise WorkspaceError(f"{path} (held-out data) is corrupt ({str(exc)[:120]}); remove it to drop that "
                             "task's held-out data") from None
    y = np.array([index[str(n)] for n in labels], dtype=np.int64)
    return TaskData(taps, y, None if present.all() else present.astype(np.float32))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


__all__ = ["Workspace", "WorkspaceError", "DataFormatError", "TaskRefused", "DEFAULT_MAX_FORGETTING"]
