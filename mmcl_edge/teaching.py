"""Teaching a device: one task from a folder (or anything converted into one) into a workspace.

The CLI's ``teach``, a robot's bag (converted to a folder first) and the service's inbox all come
here; ``Workspace.learn_task`` is what learns the task. The first task creates the workspace, with
its modalities and their options taken from that task's folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mmcl_edge.config import LearnConfig
from mmcl_edge.data.dataset import TaskInput
from mmcl_edge.data.generic import read_task_folder
from mmcl_edge.preprocess import PreprocessSpec
from mmcl_edge.workspace import DEFAULT_MAX_FORGETTING, Workspace


def open_for_task(root, specs: dict[str, PreprocessSpec], task: TaskInput, overrides: dict, where: str) -> Workspace:
    """The workspace at ``root``, created from this task's modalities when the path is empty."""
    root = Path(root).expanduser()
    if (root / "workspace.json").is_file():
        ws = Workspace.open(root)
        ws.check_modalities(specs, where)
        if overrides:
            with ws.lock("teach"):
                ws.apply_overrides(overrides)
        return ws
    return Workspace.create_taught(root, specs, task.train, LearnConfig().override(overrides))


def teach_folder(root, folder, *, holdout: float | None = None, seed: int = 0, overrides: dict | None = None,
                 max_forgetting: float | None = DEFAULT_MAX_FORGETTING, force: bool = False,
                 progress: Callable | None = None, origin: dict | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[Workspace, dict]:
    """Learn the task in ``folder`` (generic format) as the workspace's next task."""
    specs, task = read_task_folder(folder, holdout=holdout, seed=seed)
    if origin:
        task.origin = {**task.origin, **origin}
    ws = open_for_task(root, specs, task, dict(overrides or {}), str(folder))
    ws.log = log
    return ws, ws.learn_task(task, progress=progress, max_forgetting=max_forgetting, force=force)
