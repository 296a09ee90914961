"""The generic data format for user data with any number of modalities.

A folder holding::

    modalities.json   {"accel": {"kind": "timeseries"}, "gyro": {"kind": "timeseries"}, ...}
    train.npz         x_<modality> [N, ...] for each modality (a text modality: a unicode
                      string array [N]), y [N] integer labels,
                      optional domain [N] integer domain ids
    test.npz          the same arrays for the test split

Options beside "kind" (e.g. "sample_rate", "image_size", "series_length") go to the modality's
preprocessing. An optional top-level "class_names": [...] names the labels in sorted order.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from mmcl_edge.data.dataset import (DataFormatError, MultiModalDataset, Scenario, TaskInput,
                                    class_incremental_tasks, domain_incremental_tasks)
from mmcl_edge.preprocess import KINDS, PreprocessSpec, unfitted
from mmcl_edge.text import text_present
from mmcl_edge.runtime.npz import NpzReader


def _read_specs(folder: Path) -> tuple[dict[str, PreprocessSpec], list[str] | None]:
    path = folder / "modalities.json"
    if not path.is_file():
        raise DataFormatError(f"{path} is missing: it declares each modality's kind, e.g. "
                              '{"accel": {"kind": "timeseries"}}')
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path} is not valid JSON: {exc}") from None
    class_names = raw.pop("class_names", None) if isinstance(raw, dict) else None
    if isinstance(raw, dict) and isinstance(raw.get("modalities"), dict):
        raw = raw["modalities"]
    if not isinstance(raw, dict) or not raw:
        raise DataFormatError(f"{path} must map each modality name to its options, e.g. "
                              '{"accel": {"kind": "timeseries"}}')
    specs = {}
    for name, opts in raw.items():
        if not isinstance(name, str) or not MODALITY_NAME.match(name) or "__" in name:
            raise DataFormatError(f"modality name {name!r} in {path} must be a plain identifier (letters, digits, "
                                  "single underscores, starting with a letter, at most 64 characters): it names "
                                  "files and graph inputs")
        if not isinstance(opts, dict) or "kind" not in opts:
            raise DataFormatError(f"modality {name!r} in {path} needs a \"kind\" ({', '.join(KINDS)})")
        if opts["kind"] not in KINDS:
            raise DataFormatError(f"modality {name!r} has unknown kind {opts['kind']!r}; "
                                  f"known kinds: {', '.join(KINDS)}")
        known = set(PreprocessSpec.__dataclass_fields__) - {"options"}
        extra = {k: v for k, v in opts.items() if k not in known}
        given = {k: v for k, v in opts.items() if k in known}
        _check_spec_options(name, path, given)
        try:
            specs[name] = PreprocessSpec(**given, options=extra)
        except (TypeError, ValueError) as exc:
            raise DataFormatError(f"modality {name!r} in {path}: {exc}") from None
    return specs, class_names


MODALITY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_POSITIVE_INTS = ("image_size", "sample_rate", "n_mels", "n_fft", "hop", "series_length")


def _check_spec_options(name: str, path: Path, opts: dict) -> None:
    """Preprocessing options must be numbers in range: a bad one is a plain DataFormatError here,
    not a traceback deep inside preprocessing."""
    for key in _POSITIVE_INTS:
        if key in opts:
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise DataFormatError(f"modality {name!r} in {path}: {key} must be a positive integer, not {v!r}")
    if "clip_seconds" in opts:
        v = opts["clip_seconds"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
            raise DataFormatError(f"modality {name!r} in {path}: clip_seconds must be a number in (0, 3600], not {v!r}")


def _read_split(folder: Path, split: str, specs: dict[str, PreprocessSpec]) -> tuple[dict, np.ndarray, np.ndarray | None]:
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise DataFormatError(f"{path} is missing")
    with NpzReader(path, DataFormatError) as npz:  # only the members used, each size-checked first
        wanted = ("y", "domain", *(f"x_{m}" for m in specs), *(k for k in npz.names if k.startswith("present_")))
        arrays = {k: npz.read(k) for k in wanted if k in npz.names}
        arrays.update({k: None for k in npz.names if k.startswith("x_") and k not in arrays})  # named, never read
    if "y" not in arrays:
        raise DataFormatError(f"{path} has no 'y' array of integer labels")
    y = arrays["y"]
    if y.ndim != 1:
        raise DataFormatError(f"'y' in {path} must be 1-D (one label per sample), got shape {y.shape}")
    if len(y) == 0:
        raise DataFormatError(f"{path} holds no samples ('y' is empty)")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataFormatError(f"'y' in {path} must hold integer labels, got dtype {y.dtype}")
    undeclared = sorted(k[2:] for k in arrays if k.startswith("x_") and k[2:] not in specs)
    if undeclared:
        raise DataFormatError(f"{path} has arrays for modalities not declared in modalities.json: "
                              f"{', '.join(undeclared)}")
    present = _read_presence(arrays, path, specs, len(y))
    samples = {}
    for name, spec in specs.items():
        key = f"x_{name}"
        if key not in arrays:
            raise DataFormatError(f"{path} has no array '{key}' for the declared modality {name!r}")
        x = arrays[key]
        if len(x) != len(y):
            raise DataFormatError(f"'{key}' in {path} has {len(x)} samples but 'y' has {len(y)}")
        if spec.kind == "text":
            if x.dtype.kind != "U" or x.ndim != 1:
                raise DataFormatError(f"'{key}' in {path} holds the text modality {name!r}: it must be a 1-D "
                                      f"unicode string array [N] (numpy dtype '<U...'), got dtype {x.dtype} "
                                      f"and shape {x.shape}")
            samples[name] = [np.asarray(s) for s in x]
            said = text_present(x)  # an empty string: the sample has no such text (a review without a title)
            if not said.all():
                present = dict(present or {})
                present[name] = present.get(name, np.ones(len(y), bool)) & said
                if not np.stack([present.get(m, np.ones(len(y), bool)) for m in specs]).any(axis=0).all():
                    raise DataFormatError(f"{path}: a sample has no modality present (empty texts included)")
            continue
        if not np.issubdtype(x.dtype, np.number):
            raise DataFormatError(f"'{key}' in {path} must be numeric, got dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.floating):
            bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
                                 & (present or {}).get(name, np.ones(len(x), bool)))
            if len(bad):
                raise DataFormatError(f"'{key}' in {path} has NaN or infinite values in {len(bad)} "
                                      f"samples (first: sample {bad[0]})")
        if spec.kind == "timeseries" and x.ndim == 3 and x.shape[1] < x.shape[2]:
            warnings.warn(f"'{key}' in {path} has shape {x.shape}, read as [N, T={x.shape[1]}, C={x.shape[2]}]: "
                          f"fewer time steps than channels. If the array is [N, C, T], transpose it to [N, T, C] "
                          f"(np.swapaxes(x, 1, 2))", DataLayoutWarning, stacklevel=2)
        samples[name] = [np.asarray(s) for s in x]
    domain = arrays.get("domain")
    if domain is not None:
        if len(domain) != len(y):
            raise DataFormatError(f"'domain' in {path} has {len(domain)} entries but 'y' has {len(y)}")
        if not np.issubdtype(domain.dtype, np.integer):
            raise DataFormatError(f"'domain' in {path} must hold integer ids, got dtype {domain.dtype}")
    return samples, y, domain, present


def _read_presence(arrays: dict, path: Path, specs: dict, n: int) -> dict[str, np.ndarray] | None:
    """Optional ``present_<modality>`` boolean [N] arrays: False marks a sample that lacks the modality
    (its ``x_`` entry is then ignored). Every sample must keep at least one modality."""
    present = {}
    for key in arrays:
        if not key.startswith("present_"):
            continue
        name = key[len("present_"):]
        if name not in specs:
            raise DataFormatError(f"'{key}' in {path} names no declared modality (declared: {', '.join(specs)})")
        p = arrays[key]
        if p.shape != (n,) or not (p.dtype == bool or np.issubdtype(p.dtype, np.integer)) or not np.isin(p, (0, 1)).all():
            raise DataFormatError(f"'{key}' in {path} must be a boolean array of one value per sample ({n}), "
                                  f"got dtype {p.dtype} shape {p.shape}")
        present[name] = p.astype(bool)
    if not present:
        return None
    full = np.stack([present.get(m, np.ones(n, bool)) for m in specs])
    empty = np.flatnonzero(~full.any(axis=0))
    if len(empty):
        raise DataFormatError(f"{path}: {len(empty)} sample(s) have no modality present (first: sample {empty[0]}); "
                              "every sample needs at least one")
    return present


class DataLayoutWarning(UserWarning):
    """The data can be read, but its layout is probably not what the user meant."""


def load_generic(folder, setting: str = "class-il", classes_per_task: int = 2, seed: int = 0) -> Scenario:
    """Read and validate a generic-format folder and build its task stream."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataFormatError(f"data folder {folder} does not exist")
    if setting not in ("class-il", "domain-il"):
        raise DataFormatError(f"unknown setting {setting!r}: use class-il or domain-il")
    specs, class_names = _read_specs(folder)
    xs_train, y_train, d_train, p_train = _read_split(folder, "train", specs)
    xs_test, y_test, d_test, p_test = _read_split(folder, "test", specs)
    labels = np.unique(y_train)
    unknown = sorted(set(np.unique(y_test).tolist()) - set(labels.tolist()))
    if unknown:
        raise DataFormatError(f"test.npz has labels never seen in train.npz: {unknown}")
    for name in specs:  # every sample of a modality must have one shape (the batch axis is stacked)
        shapes = {xs_train[name][0].shape, xs_test[name][0].shape} if len(xs_test[name]) else {xs_train[name][0].shape}
        if len(shapes) > 1:
            raise DataFormatError(f"modality {name!r} has samples of shape {xs_train[name][0].shape} in "
                                  f"train.npz but {xs_test[name][0].shape} in test.npz")
    # Labels become 0..K-1 in sorted order; names keep the user's values.
    remap = {int(v): i for i, v in enumerate(labels)}
    y_train = np.array([remap[int(v)] for v in y_train])
    y_test = np.array([remap[int(v)] for v in y_test])
    if class_names is None or len(class_names) != len(labels):
        class_names = [str(int(v)) for v in labels]
    train = MultiModalDataset(xs_train, y_train, d_train, p_train)
    test = MultiModalDataset(xs_test, y_test, d_test, p_test)
    if setting == "class-il":
        tasks = class_incremental_tasks(y_train, y_test, classes_per_task, seed)
    else:
        tasks = domain_incremental_tasks(y_train, d_train, d_test)
    return Scenario(folder.name, setting, train, test, specs, tasks, list(class_names))


def read_task_folder(folder, holdout: float | None = None, seed: int = 0) -> tuple[dict[str, PreprocessSpec], TaskInput]:
    """One task from a generic-format folder, as ``mmcl-edge teach`` receives it.

    ``y`` indexes the folder's own ``class_names`` (absent: the labels' values are their names).
    ``test.npz``, when there, is the task's held-out data; ``holdout`` instead keeps a seeded
    fraction of ``train.npz`` (stratified by class where a class has 2 samples or more).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataFormatError(f"task folder {folder} does not exist")
    specs, class_names = _read_specs(folder)
    xs, y, dom, present = _read_split(folder, "train", specs)
    train = MultiModalDataset(xs, y, dom, present)
    heldout = None
    if (folder / "test.npz").is_file():
        if holdout:
            raise DataFormatError(f"{folder} has a test.npz: it is the held-out data; drop --holdout")
        xt, yt, dt, pt = _read_split(folder, "test", specs)
        heldout = MultiModalDataset(xt, yt, dt, pt)
    names = _task_class_names(folder, class_names, train.y, None if heldout is None else heldout.y)
    if holdout:
        if not 0 < holdout < 1:
            raise DataFormatError(f"--holdout must be a fraction in (0, 1), not {holdout}")
        train, heldout = split_holdout(train, holdout, seed)
    origin = {"folder": str(folder.resolve()), "data_sha256": folder_digest(folder)}
    return specs, TaskInput(train, names, heldout, origin, folder.name)


def _task_class_names(folder: Path, class_names, y: np.ndarray, y_test: np.ndarray | None) -> list[str]:
    labels = np.unique(y if y_test is None else np.concatenate([y, y_test]))
    if class_names is None:
        if labels.min() < 0:
            raise DataFormatError(f"labels in {folder} must be >= 0 (they index class_names), got {labels.min()}")
        names = [str(i) for i in range(int(labels.max()) + 1)]
        return names
    if not isinstance(class_names, list) or not all(isinstance(n, str) and n.strip() for n in class_names):
        raise DataFormatError(f"class_names in {folder / 'modalities.json'} must be a list of non-empty strings")
    if len(set(class_names)) != len(class_names):
        raise DataFormatError(f"class_names in {folder / 'modalities.json'} repeats a name")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DataFormatError(f"labels in {folder} must index class_names (0..{len(class_names) - 1}); "
                              f"found {int(labels.min())}..{int(labels.max())}")
    return list(class_names)


def split_holdout(ds: MultiModalDataset, fraction: float, seed: int = 0) -> tuple[MultiModalDataset, MultiModalDataset]:
    """A seeded, per-class share of ``ds`` kept aside; a class with one sample keeps it for training."""
    rng = np.random.default_rng(seed + 104729)
    held = []
    for c in np.unique(ds.y):
        idx = rng.permutation(np.flatnonzero(ds.y == c))
        if len(idx) >= 2:
            held.extend(idx[:max(1, int(round(fraction * len(idx))))])
    if not held:
        raise DataFormatError("--holdout needs a class with at least 2 samples")
    mask = np.zeros(len(ds), bool)
    mask[held] = True
    return ds.subset(np.flatnonzero(~mask)), ds.subset(np.flatnonzero(mask))


def folder_digest(folder: Path) -> str:
    """sha256 over a task folder's files (names and bytes): the task's data in its provenance."""
    import hashlib

    h = hashlib.sha256()
    for name in ("modalities.json", "train.npz", "test.npz"):
        path = folder / name
        if path.is_file():
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def write_task_folder(folder, specs: dict[str, PreprocessSpec], train: MultiModalDataset, names: list[str],
                      heldout: MultiModalDataset | None = None) -> Path:
    """Write a task in the generic format (``y`` indexes ``names``): what ``read_task_folder`` reads.

    The one writer of the format, for producers that make tasks (a robot's bag, a benchmark cut
    into folders, tests). Absent samples get zeros of their modality's shape and ``present_`` False.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    def options(spec):  # the kind and what differs from its defaults, as a person would write it
        default = PreprocessSpec(spec.kind).to_dict()
        return {"kind": spec.kind, **{k: v for k, v in spec.to_dict().items()
                                      if k not in ("kind", "options") and v != default[k]}, **spec.options}

    opts = {m: options(unfitted(s)) for m, s in specs.items()}
    (folder / "modalities.json").write_text(json.dumps({**opts, "class_names": list(names)}, indent=1))
    for split, ds in (("train", train), ("test", heldout)):
        if ds is None:
            continue
        arrays = {"y": np.asarray(ds.y, dtype=np.int64)}
        for m in specs:
            mask = ds.presence(m)
            ref = next((np.asarray(x) for x, p in zip(ds.samples[m], mask) if p), None)
            rows = [np.asarray(x) if p or ref is None else np.zeros_like(ref) for x, p in zip(ds.samples[m], mask)]
            arrays[f"x_{m}"] = np.stack(rows)
            if not mask.all():
                arrays[f"present_{m}"] = mask
        if ds.domain is not None:
            arrays["domain"] = np.asarray(ds.domain)
        np.savez(folder / f"{split}.npz", **arrays)
    return folder
