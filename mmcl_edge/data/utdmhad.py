"""UTD-MHAD: 27 actions seen at once by a depth camera (video), its skeleton tracker and a wearable IMU.

The data set is prepared in the generic format (see ``../shared/data/utd-mhad/SOURCE.md``): a folder
``utd-mhad-cross-subject`` (the published cross-subject split) and ``utd-mhad-subjects`` (trial 4 of
every subject held out; ``domain`` = subject). It is never downloaded by this code.

- ``utd-mhad-cil``: cross-subject split, 27 classes in 9 tasks of 3, class order seeded.
- ``utd-mhad-dil``: per-subject split, 4 tasks of 2 subjects each (subjects 1+2, 3+4, ...), every
  task tested on its subjects' held-out trial, so the last row covers every subject.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmcl_edge.data.dataset import DataFormatError, Scenario, domain_incremental_tasks
from mmcl_edge.data.generic import load_generic
from mmcl_edge.data.locate import find_data_folder

ENV_VAR = "MMCL_EDGE_UTD_MHAD"
FOLDERS = {"class-il": "utd-mhad-cross-subject", "domain-il": "utd-mhad-subjects"}
CLASSES_PER_TASK = 3
SUBJECTS_PER_TASK = 2


def locate_utd_mhad(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``utd-mhad-cross-subject/`` and ``utd-mhad-subjects/``.

    Looked for in ``data_dir``, then ``$MMCL_EDGE_UTD_MHAD``, then ``$MMCL_EDGE_DATA``; each may name
    that folder itself, its parent (``.../data`` with a ``utd-mhad/`` inside) or one of its subfolders.
    """
    found, where = find_data_folder(
        data_dir, ENV_VAR, lambda root: (root, root / "utd-mhad", root.parent),
        lambda c: all((c / f / "train.npz").is_file() for f in FOLDERS.values()))
    if found is not None:
        return found
    raise DataFormatError(
        f"UTD-MHAD not found{where}. It is the folder with utd-mhad-cross-subject/ and utd-mhad-subjects/ "
        f"in the generic format; point to it with --data-dir PATH or {ENV_VAR}=PATH. This project ships a "
        "prepared copy in ../shared/data/utd-mhad; the original data set (C. Chen, R. Jafari, N. Kehtarnavaz, "
        "ICIP 2015) is published by the University of Texas at Dallas, and its SOURCE.md says how it was prepared.")


def load_utd_mhad(setting: str = "class-il", data_dir=None, seed: int = 0) -> Scenario:
    root = locate_utd_mhad(data_dir)
    folder = root / FOLDERS[setting]
    if setting == "class-il":
        sc = load_generic(folder, setting="class-il", classes_per_task=CLASSES_PER_TASK, seed=seed)
        sc.name = "utd-mhad-cil"
        sc.unseen_test_domains = True  # trained on subjects 1, 3, 5, 7; tested on 2, 4, 6, 8
        return sc
    sc = load_generic(folder, setting="domain-il", seed=seed)
    # tasks = pairs of subjects, in subject order; the pairing is part of the benchmark, not seeded
    group_train = sc.train.domain // SUBJECTS_PER_TASK
    group_test = sc.test.domain // SUBJECTS_PER_TASK
    names = {g: "subjects " + "+".join(str(SUBJECTS_PER_TASK * g + i + 1) for i in range(SUBJECTS_PER_TASK))
             for g in np.unique(group_train).tolist()}
    sc.tasks = domain_incremental_tasks(sc.train.y, group_train, group_test, names)
    sc.name = "utd-mhad-dil"
    return sc
