"""Teaching the device after deployment: tasks from folders that did not exist when it was set up."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mmcl_edge.cli.main import app
from mmcl_edge.data.dataset import MultiModalDataset
from mmcl_edge.data.synthetic import synthetic_arrays
from mmcl_edge.data.generic import write_task_folder
from mmcl_edge.preprocess import PreprocessSpec

runner = CliRunner()
NAMES = ["wave", "clap", "jump", "sit", "kick", "punch"]
SPECS = {"m0": PreprocessSpec("vector"), "m1": PreprocessSpec("vector")}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def arrays():
    """Six classes seen in two conditions (domains): the device meets them over three days."""
    return synthetic_arrays(n_classes=6, per_class=60, domains=2, seed=3)


def day_folder(root, arrays, classes, domain, *, shuffle=False, per_class=None, test=True, seed=0, names=None):
    """A task folder of ``classes`` (indices into NAMES) in one condition; y indexes the folder's own names."""
    rng = np.random.default_rng(seed)
    names = names or [NAMES[c] for c in classes]
    pick_train, pick_test = [], []
    for c in classes:
        idx = np.flatnonzero((arrays["y"] == c) & (arrays["domain"] == domain))
        n_train = per_class or 20
        pick_train.extend(idx[:n_train])
        pick_test.extend(idx[-10:])

    def ds(idx):
        idx = np.array(idx)
        y = np.array([names.index(NAMES[c]) for c in arrays["y"][idx]])
        if shuffle:
            y = rng.permutation(y)
        return MultiModalDataset({m: list(arrays[f"x_{m}"][idx]) for m in SPECS}, y)

    return write_task_folder(root, SPECS, ds(pick_train), names, ds(pick_test) if test else None)


def test_teach_day1_day2_day3_names_new_classes_and_keeps_the_matrix(tmp_path, arrays):
    ws = tmp_path / "ws"
    day1 = day_folder(tmp_path / "day1", arrays, [0, 1, 2, 3], 0)
    day2 = day_folder(tmp_path / "day2", arrays, [4, 5], 0)
    day3 = day_folder(tmp_path / "day3", arrays, [0, 1], 1)           # known classes, new conditions
    for day in (day1, day2, day3):
        r = invoke("teach", "-w", ws, day, "--epochs", 3)
        assert r.exit_code == 0, r.output
    report = json.loads((ws / "report.json").read_text())
    assert report["class_names"] == NAMES                              # names, in order of arrival
    matrix = report["accuracy_matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert matrix[0][1] is None and matrix[1][2] is None               # no task is tested before it arrives
    assert all(v is not None and v > 0.7 for v in matrix[2])
    assert [t["classes_added"] for t in report["tasks"]] == [NAMES[:4], NAMES[4:], []]
    # predict names a class that did not exist on day 1
    test = np.load(day2 / "test.npz")
    np.savez(tmp_path / "x.npz", x_m0=test["x_m0"], x_m1=test["x_m1"])
    r = invoke("predict", "-w", ws, "-i", tmp_path / "x.npz", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    labels = doc["labels"]
    assert len(labels) == len(test["y"]) == len(doc["novelty"]) == len(doc["unknown"])
    assert np.mean([lbl == ["kick", "punch"][y] for lbl, y in zip(labels, test["y"])]) > 0.7
    # provenance: the pack says where its task came from
    manifest = json.loads((ws / "packs" / (ws / "current").read_text().strip() / "manifest.json").read_text())
    prov = manifest["provenance"]
    assert prov["origin"]["folder"] == str(day3.resolve()) and len(prov["data_sha256"]) == 64
    assert prov["samples_per_class"] == {"wave": 20, "clap": 20} and prov["classes_added"] == []


def test_a_shuffled_label_task_is_refused_and_nothing_changes(tmp_path, arrays):
    ws = tmp_path / "ws"
    assert invoke("teach", "-w", ws, day_folder(tmp_path / "d1", arrays, [0, 1, 2, 3], 0), "--epochs", 3).exit_code == 0
    serving = (ws / "current").read_text()
    state_files = sorted(p.name for p in (ws / "state").iterdir())
    # an operator's mislabelled batch: more samples of the known classes, in the same conditions, labels shuffled
    bad = day_folder(tmp_path / "bad", arrays, [0, 1, 2, 3], 0, shuffle=True, per_class=50)
    r = invoke("teach", "-w", ws, bad, "--epochs", 3)
    assert r.exit_code == 3, r.output
    assert "refused" in r.output
    assert (ws / "current").read_text() == serving
    assert sorted(p.name for p in (ws / "state").iterdir()) == state_files
    report = json.loads((ws / "report.json").read_text())
    refused = report["refused"][-1]
    assert refused["gate"]["drop_points"] > 5 and set(refused["gate"]["per_class"]) == set(NAMES[:4])
    # --force publishes a refused task, and says so
    r = invoke("teach", "-w", ws, bad, "--epochs", 3, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((ws / "report.json").read_text())["tasks"][-1]["gate"]["forced"] is True
    assert (ws / "current").read_text() != serving


def test_one_sample_per_class_and_holdout(tmp_path, arrays):
    ws = tmp_path / "ws"
    assert invoke("teach", "-w", ws, day_folder(tmp_path / "d1", arrays, [0, 1, 2, 3], 0), "--epochs", 3).exit_code == 0
    one = day_folder(tmp_path / "one", arrays, [4, 5], 0, per_class=1, test=False)
    r = invoke("teach", "-w", ws, one, "--epochs", 3)
    assert r.exit_code == 0, r.output
    assert json.loads((ws / "report.json").read_text())["class_names"] == NAMES
    five = day_folder(tmp_path / "five", arrays, [0, 1], 1, per_class=10, test=False)
    r = invoke("teach", "-w", ws, five, "--holdout", 0.2, "--epochs", 3)
    assert r.exit_code == 0, r.output
    report = json.loads((ws / "report.json").read_text())
    assert report["tasks"][-1]["heldout_samples"] == 4 and report["tasks"][-1]["train_samples"] == 16
    assert report["accuracy_matrix"][-1][-1] is not None


def test_a_task_with_other_modalities_or_options_is_refused_in_one_line(tmp_path, arrays):
    ws = tmp_path / "ws"
    assert invoke("teach", "-w", ws, day_folder(tmp_path / "d1", arrays, [0, 1], 0), "--epochs", 2).exit_code == 0
    other = day_folder(tmp_path / "d2", arrays, [2, 3], 0)
    meta = json.loads((other / "modalities.json").read_text())
    meta["m1"]["kind"] = "timeseries"
    (other / "modalities.json").write_text(json.dumps(meta))
    r = invoke("teach", "-w", ws, other)
    assert r.exit_code == 2 and "error:" in r.output and "'m1'" in r.output and "kind" in r.output
    assert "Traceback" not in r.output
    r = invoke("teach", "-w", ws, tmp_path / "nowhere")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_python_api_teaches_by_class_name(tmp_path, arrays):
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.runtime import Runtime
    from mmcl_edge.workspace import Workspace

    ws = Workspace.create_taught(tmp_path / "ws", SPECS, MultiModalDataset(
        {m: [arrays[f"x_{m}"][0]] for m in SPECS}, np.zeros(1, int)), LearnConfig().override({"train.epochs": 3}))
    first = np.flatnonzero(arrays["domain"] == 0)
    pick = [i for i in first if arrays["y"][i] < 3][:60]
    result = ws.teach({m: [arrays[f"x_{m}"][i] for i in pick] for m in SPECS}, [NAMES[arrays["y"][i]] for i in pick])
    assert result["status"] == "published"
    # a sample that lacks a modality (None) is taught too
    more = [i for i in first if arrays["y"][i] == 3][:10]
    samples = {"m0": [arrays["x_m0"][i] for i in more], "m1": [None] * 5 + [arrays["x_m1"][i] for i in more[5:]]}
    assert ws.teach(samples, ["sit"] * 10)["status"] == "published"
    rt = Runtime(tmp_path / "ws")
    i = more[0]
    assert rt.predict({"m0": arrays["x_m0"][i], "m1": arrays["x_m1"][i]}).labels == ["sit"]


def test_novelty_flags_classes_never_taught_and_few_familiar_ones(tmp_path, arrays):
    """Every answer says how unfamiliar its sample is; classes never taught are mostly "unknown"."""
    from mmcl_edge.bench.teach import auroc
    from mmcl_edge.runtime import Runtime

    ws = tmp_path / "ws"
    assert invoke("teach", "-w", ws, day_folder(tmp_path / "d1", arrays, [0, 1, 2, 3], 0), "--epochs", 3).exit_code == 0
    rt = Runtime(ws)
    manifest = rt.pack.manifest["novelty"]
    assert manifest["method"] == "max-softmax" and 0 < manifest["threshold"] < 1
    assert manifest["calibrated_on"] == "held-out" and manifest["calibration_samples"] == 40  # day1's test.npz
    seen = np.flatnonzero((arrays["y"] < 4) & (arrays["domain"] == 0))[-80:]
    unseen = np.flatnonzero(arrays["y"] >= 4)
    ps = rt.predict({m: list(arrays[f"x_{m}"][seen]) for m in SPECS})
    pu = rt.predict({m: list(arrays[f"x_{m}"][unseen]) for m in SPECS})
    assert np.allclose(ps.novelty, 1 - ps.scores, atol=1e-6)
    assert auroc(ps.novelty, pu.novelty) > 0.9
    assert ps.unknown.mean() < 0.15 and pu.unknown.mean() > 0.6


def test_auroc_counts_ties_as_half():
    from mmcl_edge.bench.teach import auroc

    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.5


def test_present_arrays_mark_absent_samples(tmp_path, arrays):
    """A sample without a modality (present_<m> False) is taught with that modality absent: no taps
    are extracted for it, and a sample with no modality at all is a plain error."""
    from mmcl_edge.data.generic import read_task_folder

    folder = day_folder(tmp_path / "d1", arrays, [0, 1, 2, 3], 0, per_class=20)
    with np.load(folder / "train.npz") as z:
        data = dict(z)
    n = len(data["y"])
    present = np.arange(n) % 2 == 0
    data["x_m1"][~present] = np.nan          # an absent sample's values are never read
    np.savez(folder / "train.npz", **data, present_m1=present)
    specs, task = read_task_folder(folder)
    assert task.train.presence("m1").sum() == n // 2 and task.train.presence("m0").all()
    r = invoke("teach", "-w", tmp_path / "ws", folder, "--epochs", 3)
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "ws" / "report.json").read_text())["tasks"][0]
    test_n = 40
    assert rec["samples_extracted"] == n + n // 2 + 2 * test_n      # m0: all, m1: the present half, held-out both
    np.savez(folder / "train.npz", **data, present_m1=present, present_m0=present)  # even rows keep m1; odd rows: none
    r = invoke("teach", "-w", tmp_path / "ws2", folder)
    assert r.exit_code == 2 and "no modality present" in r.output


def test_a_workspace_from_before_the_task_log_stays_readable(tmp_path):
    """0.3 workspaces had no modalities in workspace.json, no held-out files and states that list
    the scenario's label indices: eval, predict and learning the next task still work."""
    from conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", "synthetic-cil", epochs=2, learn=False)
    ws.learn(task=0)
    before = json.loads((ws.root / "report.json").read_text())["accuracy_matrix"]
    meta = json.loads((ws.root / "workspace.json").read_text())
    for key in ("modalities", "input_shapes", "setting"):
        meta.pop(key)
    meta["format"] = 1
    (ws.root / "workspace.json").write_text(json.dumps(meta))
    state = json.loads((ws.root / "state" / "task_000.json").read_text())
    state["classes_seen"] = [int(c) for c in ws.scenario().tasks[0].classes]
    state.pop("class_names")
    (ws.root / "state" / "task_000.json").write_text(json.dumps(state))
    for f in (ws.root / "heldout").iterdir():
        f.unlink()
    r = invoke("eval", "-w", ws.root)
    assert r.exit_code == 0, r.output
    assert json.loads((ws.root / "report.json").read_text())["accuracy_matrix"][0][0] == before[0][0]
    r = invoke("learn", "-w", ws.root, "--scenario", "synthetic-cil", "--task", 1)
    assert r.exit_code == 0, r.output
    report = json.loads((ws.root / "report.json").read_text())
    assert len(report["accuracy_matrix"]) == 2 and report["accuracy_matrix"][1][0] is not None


def test_bench_teach_small_version_runs_the_served_path(tmp_path):
    """`bench teach` end to end on the tiny synthetic stream: task folders, the teach path against its
    baselines, and teach-to-serve through a real `serve --teach` process (the acceptance bench's small copy)."""
    out = tmp_path / "teach.json"
    r = invoke("bench", "teach", "--scenario", "synthetic-cil", "--shots", "5", "--epochs", "2",
               "--work", tmp_path / "work", "--out", out)
    assert r.exit_code == 0, r.output
    run = json.loads(out.read_text())["runs"]["5"]
    for method in ("mmcl", "imprinting", "ridge"):
        assert 0.0 <= run[method]["final_average_accuracy"] <= 1.0
    tts = run["teach_to_serve"]
    assert tts["samples_posted"] > 0 and tts["job"]["state"] == "published"
    assert tts["teach_to_serve_seconds"] is not None and tts["learn_seconds"] is not None
    assert "teach-to-serve:" in r.output
