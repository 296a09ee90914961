"""``mmcl-edge teach``: learn one task from a folder the device was given after deployment."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mmcl_edge.cli.common import DEFAULT_WORKSPACE, _pct, err, out, parse_overrides, require_extra, user_errors

REFUSED_EXIT = 3  # the gate refused the task: nothing changed, the previous pack serves


@user_errors
def teach(
    folder: Optional[Path] = typer.Argument(None, help="The task: a generic-format folder (modalities.json with "
                                                       "class_names, train.npz with y indexing them, optional test.npz)."),
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w",
                                   help="The workspace; the first teach on an empty path creates it from the folder's modalities."),
    holdout: Optional[float] = typer.Option(None, help="Keep this seeded fraction of train.npz (per class) as the "
                                                       "task's held-out data, when the folder has no test.npz."),
    max_forgetting: float = typer.Option(5.0, help="Refuse the new pack when accuracy on the held-out data of earlier "
                                                   "tasks drops by more than this many points."),
    force: bool = typer.Option(False, help="Publish the task even if the forgetting gate refuses it."),
    seed: int = typer.Option(0, help="Seed for --holdout."),
    epochs: Optional[int] = typer.Option(None, help="Adapter training epochs for this task (and later ones)."),
    set_: list[str] = typer.Option([], "--set", help="Config override key=value (recorded in workspace.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as one JSON object."),
    bag: Optional[Path] = typer.Option(None, help="Teach from a robot's recording instead of a folder: a rosbag2 "
                                                  "folder (sqlite3 or MCAP), an .mcap file or a ROS 1 .bag."),
    topics: Optional[Path] = typer.Option(None, help="With --bag: TOPICS.json, which topic feeds which modality."),
    labels: Optional[Path] = typer.Option(None, help="With --bag: LABELS.csv, rows start,end,label[,split] in "
                                                     "seconds from the bag's first message."),
):
    """Teach the device one task: new classes (names it has not seen), more samples of known classes, or both.

    Labels are class names; the head grows for new ones. Before the new pack goes live it is tested on the held-out data of earlier tasks: if it forgets too much it is refused (exit code 3), recorded in report.json with the per-class changes, and the previous pack keeps serving.
    """
    require_extra("learn")
    from mmcl_edge.cli.progress import progress_bar
    from mmcl_edge.errors import ConfigError
    from mmcl_edge.teaching import teach_folder

    if (folder is None) == (bag is None):
        raise ConfigError("teach needs a task folder (mmcl-edge teach -w WS DIR) or a recording "
                          "(mmcl-edge teach -w WS --bag BAG --topics TOPICS.json --labels LABELS.csv), one of them")
    overrides = parse_overrides(set_)
    if epochs is not None:
        overrides["train.epochs"] = epochs

    def run(task_folder: Path, origin: dict | None):
        return teach_folder(workspace, task_folder, holdout=holdout, seed=seed, overrides=overrides,
                            max_forgetting=max_forgetting, force=force, progress=progress_bar, origin=origin,
                            log=lambda note: err.print(f"[yellow]recovered:[/] {note}", highlight=False))

    if bag is None:
        ws, result = run(folder, None)
    else:
        from mmcl_edge.cli.bag import bag_task_folder

        with bag_task_folder(workspace, bag, topics, labels) as (task_folder, origin):
            ws, result = run(task_folder, origin)
    print_outcome(ws, result, as_json)
    if result["status"] == "refused":
        raise typer.Exit(REFUSED_EXIT)


def print_outcome(ws, result: dict, as_json: bool) -> None:
    """One task's outcome: published (pack, classes added, accuracy on every held-out set) or refused."""
    rec, gate = result["record"], result["gate"]
    if as_json:
        out.print_json(json.dumps({k: result.get(k) for k in ("status", "task", "pack", "reason", "row", "gate")}
                                  | {"classes_added": rec["classes_added"], "class_names": ws.class_names(),
                                     "samples_per_class": rec["samples_per_class"]}))
        return
    added = ", ".join(rec["classes_added"]) or "none (more samples of known classes)"
    if result["status"] == "refused":
        err.print(f"[bold red]refused:[/] task {result['task']} ({rec['name']}): {result['reason']}. Nothing changed: "
                  f"the previous pack keeps serving; --force publishes it anyway.", highlight=False, soft_wrap=True)
        return
    forced = " (forced past the forgetting gate)" if gate.get("forced") else ""
    err.print(f"task {result['task']} ({rec['name']}): {sum(rec['samples_per_class'].values())} samples, new classes: "
              f"{added}; learned in {rec['train_seconds']:.1f}s (taps {rec['extract_seconds']:.1f}s); "
              f"pack {result['pack']} serving{forced}", highlight=False)
    if gate.get("measured_on"):
        err.print(f"earlier tasks' held-out accuracy {100 * gate['accuracy_before']:.1f}% -> "
                  f"{100 * gate['accuracy_after']:.1f}% ({gate['measured_on']} samples)", highlight=False)
    row = " ".join(f"T{j}:{_pct(v).strip()}" for j, v in enumerate(result["row"]))
    out.print(f"accuracy on each task's held-out data (%): {row}   classes: {len(ws.class_names())}")
    out.print(f"report: {ws.root / 'report.json'}")
