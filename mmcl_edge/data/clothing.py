"""Clothing reviews: what kind of garment a shopper's review is about (18 classes), from her review
text, its title (empty for 13% of the reviews: a real missing modality) and a tabular vector (age,
rating, recommends, positive-feedback count).

Prepared in the generic format (see ``../shared/data/clothing-reviews/SOURCE.md``): the folder
``clothing-cil``; never downloaded by this code.

- ``clothing-cil``: 18 classes in 6 tasks of 3, class order seeded.
"""
from __future__ import annotations

import os
from pathlib import Path

from mmcl_edge.data.dataset import DataFormatError, Scenario
from mmcl_edge.data.generic import load_generic
from mmcl_edge.data.locate import find_data_folder

ENV_VAR = "MMCL_EDGE_CLOTHING"
FOLDER = "clothing-cil"
CLASSES_PER_TASK = 3


def locate_clothing(data_dir: str | os.PathLike | None = None) -> Path:
    """The ``clothing-cil`` folder, looked for in ``data_dir``, then ``$MMCL_EDGE_CLOTHING``, then
    ``$MMCL_EDGE_DATA``; each may name that folder, the folder holding it, or their parent (``.../data``
    with a ``clothing-reviews/`` inside)."""
    found, where = find_data_folder(
        data_dir, ENV_VAR, lambda root: (root, root / FOLDER, root / "clothing-reviews" / FOLDER, root.parent / FOLDER),
        lambda c: (c / "train.npz").is_file() and (c / "modalities.json").is_file())
    if found is not None:
        return found
    raise DataFormatError(
        f"the clothing reviews were not found{where}. They are the folder {FOLDER}/ in the generic format; point "
        f"to it (or the folder holding it) with --data-dir PATH or {ENV_VAR}=PATH. This project ships a prepared "
        "copy in ../shared/data/clothing-reviews; its SOURCE.md says where the reviews come from.")


def load_clothing(data_dir=None, seed: int = 0) -> Scenario:
    sc = load_generic(locate_clothing(data_dir), setting="class-il", classes_per_task=CLASSES_PER_TASK, seed=seed)
    sc.name = "clothing-cil"
    return sc
