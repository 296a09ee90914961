"""The generic data format (modalities.json + train.npz + test.npz) and the FSDD locator."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmcl_edge.data import DataFormatError, load_scenario
from mmcl_edge.data.fsdd import ENV_VAR, locate_fsdd

LABELS = np.array([10, 20, 30, 40])        # user label values; they become 0..3 in sorted order
SPECS = {"accel": {"kind": "timeseries", "series_length": 64}, "feat": {"kind": "vector"}}


def make_split(n_per_class: int, seed: int, domains: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(LABELS, n_per_class)
    domain = np.tile(np.arange(domains), len(y) // domains + 1)[: len(y)]
    return {
        "x_accel": rng.normal(size=(len(y), 50, 3)).astype(np.float32),   # [N, T, C]
        "x_feat": rng.normal(size=(len(y), 7)).astype(np.float32),        # [N, D]
        "y": y,
        "domain": domain,
    }


def write_folder(folder: Path, specs=None, train=None, test=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if specs is not False:
        (folder / "modalities.json").write_text(json.dumps(SPECS if specs is None else specs))
    if train is not False:
        np.savez(folder / "train.npz", **(make_split(6, 0) if train is None else train))
    if test is not False:
        np.savez(folder / "test.npz", **(make_split(2, 1) if test is None else test))
    return folder


def test_valid_folder_loads_class_incremental(tmp_path):
    folder = write_folder(tmp_path / "mydata")
    sc = load_scenario(data=str(folder), setting="class-il", classes_per_task=2, seed=3)
    assert sc.setting == "class-il"
    assert sc.modalities == ["accel", "feat"]
    assert sc.specs["accel"].kind == "timeseries" and sc.specs["accel"].series_length == 64
    assert sc.specs["feat"].kind == "vector"
    assert len(sc.train) == 24 and len(sc.test) == 8
    assert sorted(set(sc.train.y.tolist())) == [0, 1, 2, 3]
    assert sc.class_names == ["10", "20", "30", "40"]
    assert sc.train.samples["accel"][0].shape == (50, 3)
    assert sc.train.samples["feat"][0].shape == (7,)

    train_raw = make_split(6, 0)
    np.testing.assert_array_equal(sc.train.samples["feat"][5], train_raw["x_feat"][5])
    np.testing.assert_array_equal(sc.train.y, np.searchsorted(LABELS, train_raw["y"]))

    assert len(sc.tasks) == 2
    assert all(len(task.classes) == 2 for task in sc.tasks)
    assert sorted(c for task in sc.tasks for c in task.classes) == [0, 1, 2, 3]
    for task in sc.tasks:
        assert set(sc.train.y[task.train_idx].tolist()) == set(task.classes)
        assert set(sc.test.y[task.test_idx].tolist()) == set(task.classes)
        assert len(task.train_idx) == 12 and len(task.test_idx) == 4
    assert sc.classes_seen(1) == sc.tasks[0].classes + sc.tasks[1].classes


def test_classes_per_task_that_does_not_divide(tmp_path):
    folder = write_folder(tmp_path / "d")
    sc = load_scenario(data=str(folder), classes_per_task=3)
    assert [len(t.classes) for t in sc.tasks] == [3, 1]


def test_valid_folder_loads_domain_incremental(tmp_path):
    folder = write_folder(tmp_path / "d")
    sc = load_scenario(data=str(folder), setting="domain-il")
    assert sc.setting == "domain-il"
    assert len(sc.tasks) == 2
    train_domain = make_split(6, 0)["domain"]
    for d, task in enumerate(sc.tasks):
        assert task.classes == [0, 1, 2, 3]
        np.testing.assert_array_equal(task.train_idx, np.flatnonzero(train_domain == d))
        assert (sc.test.domain[task.test_idx] == d).all()
    assert sum(len(t.train_idx) for t in sc.tasks) == len(sc.train)


def test_class_names_from_json(tmp_path):
    specs = dict(SPECS, class_names=["walk", "run", "sit", "stand"])
    sc = load_scenario(data=str(write_folder(tmp_path / "d", specs=specs)))
    assert sc.class_names == ["walk", "run", "sit", "stand"]
    assert sc.modalities == ["accel", "feat"]


def expect_error(folder: Path, *words: str, setting: str = "class-il") -> str:
    with pytest.raises(DataFormatError) as info:
        load_scenario(data=str(folder), setting=setting)
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in the message: {message}"
    return message


def test_missing_modalities_json(tmp_path):
    expect_error(write_folder(tmp_path / "d", specs=False), "modalities.json", "missing", "kind")


def test_missing_modality_array(tmp_path):
    train = make_split(6, 0)
    del train["x_feat"]
    expect_error(write_folder(tmp_path / "d", train=train), "x_feat", "train.npz", "feat")


def test_mismatched_lengths(tmp_path):
    train = make_split(6, 0)
    train["x_accel"] = train["x_accel"][:-3]
    expect_error(write_folder(tmp_path / "d", train=train), "x_accel", "21", "24")


def test_nan_values(tmp_path):
    test = make_split(2, 1)
    test["x_feat"][5, 2] = np.nan
    expect_error(write_folder(tmp_path / "d", test=test), "x_feat", "NaN", "sample 5", "test.npz")


def test_infinite_values(tmp_path):
    train = make_split(6, 0)
    train["x_accel"][3, 10, 1] = np.inf
    expect_error(write_folder(tmp_path / "d", train=train), "x_accel", "infinite", "sample 3")


def test_unknown_kind(tmp_path):
    specs = {"accel": {"kind": "lidar"}, "feat": {"kind": "vector"}}
    msg = expect_error(write_folder(tmp_path / "d", specs=specs), "lidar", "accel", "kind")
    assert "timeseries" in msg  # the known kinds are listed


def test_missing_kind(tmp_path):
    specs = {"accel": {"series_length": 64}, "feat": {"kind": "vector"}}
    expect_error(write_folder(tmp_path / "d", specs=specs), "accel", "kind")


def test_non_integer_labels(tmp_path):
    train = make_split(6, 0)
    train["y"] = train["y"] + 0.5
    expect_error(write_folder(tmp_path / "d", train=train), "'y'", "integer")


def test_string_labels(tmp_path):
    train = make_split(6, 0)
    train["y"] = train["y"].astype(str)
    expect_error(write_folder(tmp_path / "d", train=train), "'y'", "integer")


def test_whole_float_labels_are_accepted(tmp_path):
    train, test = make_split(6, 0), make_split(2, 1)
    train["y"], test["y"] = train["y"].astype(np.float64), test["y"].astype(np.float32)
    sc = load_scenario(data=str(write_folder(tmp_path / "d", train=train, test=test)))
    assert sc.class_names == ["10", "20", "30", "40"]


def test_missing_test_npz(tmp_path):
    expect_error(write_folder(tmp_path / "d", test=False), "test.npz", "missing")


def test_missing_folder(tmp_path):
    expect_error(tmp_path / "nowhere", "nowhere", "does not exist")


def test_domain_il_without_domain(tmp_path):
    train, test = make_split(6, 0), make_split(2, 1)
    del train["domain"], test["domain"]
    expect_error(write_folder(tmp_path / "d", train=train, test=test), "domain", setting="domain-il")


def test_unseen_test_label(tmp_path):
    test = make_split(2, 1)
    test["y"][0] = 99
    expect_error(write_folder(tmp_path / "d", test=test), "99", "test.npz")


def test_undeclared_modality(tmp_path):
    train = make_split(6, 0)
    train["x_gyro"] = train["x_accel"]
    expect_error(write_folder(tmp_path / "d", train=train), "gyro", "modalities.json")


def test_locate_fsdd_without_location_says_how_to_get_the_data(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(DataFormatError) as info:
        locate_fsdd()
    message = str(info.value)
    assert "MMCL_EDGE_DATA" in message
    assert "--data-dir" in message
    assert "download-fsdd" in message


def test_locate_fsdd_with_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(DataFormatError, match="no FSDD recordings"):
        locate_fsdd()


def test_locate_fsdd_finds_nested_recordings(tmp_path, monkeypatch):
    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    (rec / "3_theo_12.wav").write_bytes(b"")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert locate_fsdd() == rec
    assert locate_fsdd(rec) == rec


def test_digit_images_read_without_scikit_learn_are_scikit_learns():
    """AV-Digits reads scikit-learn's digits CSV itself (importing scikit-learn kept 79 MB resident)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from mmcl_edge.data.avdigits import load_digit_images

    images, targets = load_digit_images()
    ref = load_digits()
    assert images.dtype == ref.images.dtype and np.array_equal(images, ref.images)
    assert np.array_equal(targets, ref.target)
    code = ("import sys; from mmcl_edge.data.avdigits import load_digit_images; load_digit_images(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
