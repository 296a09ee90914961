"""UTD-MHAD scenarios (depth video + skeleton + IMU, 27 actions, 8 subjects): task streams, subject
splits and the validation split, built from the prepared data; no taps are extracted here."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mmcl_edge.data import DataFormatError, load_scenario
from mmcl_edge.data.utdmhad import FOLDERS, locate_utd_mhad

REPO_ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


@pytest.fixture(scope="session")
def utd_dir() -> Path:
    """The prepared UTD-MHAD: ``$MMCL_EDGE_UTD_MHAD`` if set, else ``<repo>/../shared/data/utd-mhad``.

    Skips the test when it is absent (the data is never downloaded implicitly).
    """
    env = os.environ.get("MMCL_EDGE_UTD_MHAD")
    folder = Path(env).expanduser() if env else (REPO_ROOT / ".." / "shared" / "data" / "utd-mhad").resolve()
    if not all((folder / f / "train.npz").is_file() for f in FOLDERS.values()):
        pytest.skip("UTD-MHAD not found: set MMCL_EDGE_UTD_MHAD or put the prepared copy in ../shared/data/utd-mhad "
                    "(utd-mhad-cross-subject/ and utd-mhad-subjects/)")
    return folder


@pytest.fixture(scope="module")
def cil(utd_dir):
    return load_scenario("utd-mhad-cil", data_dir=str(utd_dir), seed=0)


@pytest.fixture(scope="module")
def dil(utd_dir):
    return load_scenario("utd-mhad-dil", data_dir=str(utd_dir), seed=0)


# 7. class-incremental, cross-subject ------------------------------------------------------------

def test_cil_has_9_disjoint_tasks_of_3_classes_covering_27(cil):
    assert cil.name == "utd-mhad-cil" and cil.setting == "class-il"
    assert cil.num_classes == 27 and len(cil.class_names) == 27 and cil.class_names[0] == "swipe_left"
    assert len(cil.tasks) == 9
    seen = []
    for t in cil.tasks:
        assert len(t.classes) == 3
        seen.extend(t.classes)
        # a task holds every sample of its classes, and nothing else
        np.testing.assert_array_equal(t.train_idx, np.flatnonzero(np.isin(cil.train.y, t.classes)))
        np.testing.assert_array_equal(t.test_idx, np.flatnonzero(np.isin(cil.test.y, t.classes)))
        assert len(t.train_idx) > 0 and len(t.test_idx) > 0
    assert sorted(seen) == list(range(27))           # disjoint and complete
    assert cil.classes_seen(8) == seen


def test_cil_class_order_is_seeded(cil, utd_dir):
    order = [t.classes for t in cil.tasks]
    again = load_scenario("utd-mhad-cil", data_dir=str(utd_dir), seed=0)
    other = load_scenario("utd-mhad-cil", data_dir=str(utd_dir), seed=1)
    assert [t.classes for t in again.tasks] == order
    assert [t.classes for t in other.tasks] != order
    assert sorted(c for t in other.tasks for c in t.classes) == list(range(27))


def test_cil_is_cross_subject(cil):
    assert cil.unseen_test_domains is True
    assert set(np.unique(cil.train.domain).tolist()) == {0, 2, 4, 6}   # subjects 1, 3, 5, 7
    assert set(np.unique(cil.test.domain).tolist()) == {1, 3, 5, 7}    # subjects 2, 4, 6, 8
    assert len(cil.train.y) == 431 and len(cil.test.y) == 430


def test_cil_modalities_kinds_encodings_and_backbones(cil):
    from mmcl_edge.preprocess import preprocess
    from mmcl_edge.taps import backbone_for

    assert cil.modalities == ["imu", "skeleton", "depth"]
    assert {m: (s.kind, s.encoding) for m, s in cil.specs.items()} == {
        "imu": ("timeseries", "rocket"), "skeleton": ("timeseries", "rocket"), "depth": ("video", "cnn")}
    imu, skel, depth = (cil.train.samples[m][0] for m in ("imu", "skeleton", "depth"))
    assert imu.shape == (192, 6) and skel.shape == (64, 60)
    assert depth.shape == (16, 60, 80) and depth.dtype == np.uint16 and (depth == 0).any() and depth.max() > 0
    expected = {"imu": ("rocket", (6, 128)), "skeleton": ("rocket", (60, 128)),
                "depth": ("efficientnet-lite0-video", (16, 3, 64, 64))}
    for m, (name, shape) in expected.items():
        x = preprocess(cil.train.samples[m][0], cil.specs[m])
        assert x.shape == shape and np.isfinite(x).all()
        bb = backbone_for(cil.specs[m], cil.train.samples[m][0])
        assert bb.name == name and bb.input_shape == shape


# 8. domain-incremental, subject pairs -----------------------------------------------------------

def test_dil_has_4_tasks_of_subject_pairs_with_all_27_classes(dil):
    assert dil.name == "utd-mhad-dil" and dil.setting == "domain-il"
    assert [t.name for t in dil.tasks] == ["subjects 1+2", "subjects 3+4", "subjects 5+6", "subjects 7+8"]
    test_seen = []
    for k, t in enumerate(dil.tasks):
        pair = {2 * k, 2 * k + 1}
        assert set(np.unique(dil.train.domain[t.train_idx]).tolist()) == pair
        assert set(np.unique(dil.test.domain[t.test_idx]).tolist()) == pair
        # every sample of the pair belongs to this task
        np.testing.assert_array_equal(t.train_idx, np.flatnonzero(np.isin(dil.train.domain, list(pair))))
        np.testing.assert_array_equal(t.test_idx, np.flatnonzero(np.isin(dil.test.domain, list(pair))))
        assert t.classes == list(range(27))
        assert set(np.unique(dil.train.y[t.train_idx]).tolist()) == set(range(27))
        test_seen.extend(t.test_idx.tolist())
    assert sorted(test_seen) == list(range(len(dil.test.y)))     # disjoint tests that cover every subject
    assert set(np.unique(dil.test.domain).tolist()) == set(range(8))


def test_dil_tests_are_the_held_out_trial(dil):
    """Per-subject split: train and test share subjects (not ``unseen_test_domains``) but no recording."""
    from mmcl_edge.taps import sample_key

    assert dil.unseen_test_domains is False
    assert len(dil.train.y) == 648 and len(dil.test.y) == 213
    train_keys = {sample_key(x) for x in dil.train.samples["imu"]}
    assert not any(sample_key(x) in train_keys for x in dil.test.samples["imu"])


# 9. the validation split --------------------------------------------------------------------------

@pytest.mark.parametrize("fraction, n_held", [(0.2, 1), (0.5, 2)])
def test_validation_holds_out_whole_training_subjects(cil, fraction, n_held):
    from mmcl_edge.data.dataset import validation_scenario
    from mmcl_edge.taps import sample_key

    val = validation_scenario(cil, fraction=fraction, seed=0)
    fit_subjects = set(np.unique(val.train.domain).tolist())
    val_subjects = set(np.unique(val.test.domain).tolist())
    assert not fit_subjects & val_subjects                          # a subject is fitted or validated, never both
    assert fit_subjects | val_subjects == {0, 2, 4, 6}             # training subjects only
    assert len(val_subjects) == n_held
    assert len(val.train.y) + len(val.test.y) == len(cil.train.y)
    # never a test sample: every sample of both parts is a training recording
    train_keys = {sample_key(x) for x in cil.train.samples["imu"]}
    test_keys = {sample_key(x) for x in cil.test.samples["imu"]}
    for ds in (val.train, val.test):
        keys = [sample_key(x) for x in ds.samples["imu"]]
        assert all(k in train_keys for k in keys) and not any(k in test_keys for k in keys)
    # the task stream keeps its classes; each task's parts hold only those classes
    assert [t.classes for t in val.tasks] == [t.classes for t in cil.tasks]
    assert val.unseen_test_domains and val.class_names == cil.class_names
    for t in val.tasks:
        assert set(np.unique(val.train.y[t.train_idx]).tolist()) == set(t.classes)
        assert set(np.unique(val.test.y[t.test_idx]).tolist()) <= set(t.classes) and len(t.test_idx) > 0
        assert set(np.unique(val.test.domain[t.test_idx]).tolist()) <= val_subjects


# 10. where the data is looked for, and the error when it is not there -----------------------------

def test_locate_accepts_the_folder_its_parent_or_a_subfolder(utd_dir, monkeypatch):
    monkeypatch.delenv("MMCL_EDGE_UTD_MHAD", raising=False)
    monkeypatch.delenv("MMCL_EDGE_DATA", raising=False)
    assert locate_utd_mhad(utd_dir) == utd_dir
    monkeypatch.setenv("MMCL_EDGE_UTD_MHAD", str(utd_dir / "utd-mhad-subjects"))
    assert locate_utd_mhad().resolve() == utd_dir.resolve()
    monkeypatch.delenv("MMCL_EDGE_UTD_MHAD")
    if utd_dir.name == "utd-mhad":
        monkeypatch.setenv("MMCL_EDGE_DATA", str(utd_dir.parent))
        assert locate_utd_mhad().resolve() == utd_dir.resolve()


@pytest.mark.parametrize("name", ["utd-mhad-cil", "utd-mhad-dil"])
def test_missing_data_is_a_plain_data_format_error(tmp_path, monkeypatch, name):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MMCL_EDGE_UTD_MHAD", str(empty))
    monkeypatch.setenv("MMCL_EDGE_DATA", str(empty))
    with pytest.raises(DataFormatError) as info:
        load_scenario(name)
    message = str(info.value)
    assert "--data-dir" in message and "MMCL_EDGE_UTD_MHAD" in message and str(empty) in message


def _learn_without_data(tmp_path):
    from typer.testing import CliRunner

    from mmcl_edge.cli.main import app

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"MMCL_EDGE_UTD_MHAD": str(empty), "MMCL_EDGE_DATA": str(empty)}
    return CliRunner().invoke(app, ["learn", "--scenario", "utd-mhad-cil", "-w", str(tmp_path / "ws")], env=env)


def test_cli_learn_without_data_exits_2_with_one_error(tmp_path):
    r = _learn_without_data(tmp_path)
    assert r.exit_code == 2, r.output
    assert r.output.count("error:") == 1 and r.output.lstrip().startswith("error:"), r.output
    assert "Traceback" not in r.output
    flat = " ".join(r.output.split())                  # rich may wrap the message
    assert "UTD-MHAD not found" in flat and "--data-dir" in flat and "MMCL_EDGE_UTD_MHAD" in flat


def test_cli_error_is_one_physical_line(tmp_path):
    r = _learn_without_data(tmp_path)
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1, r.output
