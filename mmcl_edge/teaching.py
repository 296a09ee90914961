"""Teaching a device: one task from a folder (or anything converted into one) into a workspace.

The CLI's ``teach``, a robot's bag (converted to a folder first) and the service's inbox all come
here; ``Workspace.learn_task`` is what learns the task. The first task creates the workspace, with
its modalities and their options taken from that task's folder.
"""
from __future__ import annotations

import os
import time
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


def learn_inbox(root, *, max_forgetting: float | None = DEFAULT_MAX_FORGETTING, holdout: float | None = None,
                seed: int = 0, wait: bool = False, poll: float = 0.1) -> list[dict]:
    """Learn every queued job of the service's inbox, oldest first, each as one task; a job ends
    ``published``, ``refused`` (the gate; with its reason) or ``failed`` (with the error). With
    ``wait`` it never returns: it loads what a task needs once and polls the inbox for the next job
    (SIGTERM ends it; a job it was learning is re-queued by the next service)."""
    from mmcl_edge.data.generic import split_holdout
    from mmcl_edge.errors import MMCLError
    from mmcl_edge.runtime.inbox import Inbox
    from mmcl_edge.workspace import task_from_samples

    inbox = Inbox(root)
    ws = Workspace.open(root)
    parent = os.getppid()
    if wait:
        ws.tap_source()  # PyTorch and the backbones' code imported and built once, before any job
    done = []
    while True:
        queued = inbox.queued()
        if not queued:
            if not wait or os.getppid() != parent:  # waiting ends with the service, however it ended
                return done
            time.sleep(poll)
            continue
        if wait:  # the workspace as it is now on disk (a task may have been taught by another command)
            ws = Workspace.open(root)
        job = queued[0]
        inbox.set_state(job, "learning", started=time.time())
        try:
            samples, labels = inbox.read_job(job)
            task = task_from_samples(samples, labels, None, ws.specs, {"inbox": job}, name=f"inbox {job}")
            if holdout:
                task.train, task.heldout = split_holdout(task.train, holdout, seed)
            result = ws.learn_task(task, max_forgetting=max_forgetting)
        except MMCLError as exc:
            done.append(inbox.set_state(job, "failed", reason=str(exc)))
            continue
        except Exception as exc:  # the job must end in a state a client can read; the error is logged there
            done.append(inbox.set_state(job, "failed", reason=f"{type(exc).__name__}: {exc}"))
            continue
        rec = result["record"]
        extra = {"task": result["task"], "classes_added": rec["classes_added"], "gate": _gate_summary(result["gate"])}
        if result["status"] == "published":
            done.append(inbox.set_state(job, "published", pack=result["pack"], **extra))
        else:
            done.append(inbox.set_state(job, "refused", reason=result["reason"], **extra))


def _gate_summary(gate: dict) -> dict:
    return {k: gate[k] for k in ("measured_on", "accuracy_before", "accuracy_after", "drop_points") if k in gate}


def main(argv=None) -> int:
    """``python -m mmcl_edge.teaching --inbox WS``: the learner process ``serve --teach`` starts."""
    import argparse

    from mmcl_edge import threads

    threads.apply_env_defaults()
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--inbox", required=True, help="the workspace whose inbox jobs to learn")
    p.add_argument("--max-forgetting", type=float, default=DEFAULT_MAX_FORGETTING)
    p.add_argument("--holdout", type=float, default=None)
    p.add_argument("--wait", action="store_true", help="keep waiting for jobs (serve --teach-warm)")
    args = p.parse_args(argv)
    learn_inbox(args.inbox, max_forgetting=args.max_forgetting, holdout=args.holdout, wait=args.wait)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
