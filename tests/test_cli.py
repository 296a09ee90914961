"""The mmcl-edge command as a user runs it: learn, eval, export, info, predict, and plain errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
from typer.testing import CliRunner

from mmcl_edge.cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_imu_dataset(folder, n_per_class=24, classes=4, seed=0):
    """Two 'timeseries' sensors (3-axis accelerometer-like, 2-axis gyro-like) whose rhythm depends on the class."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2, 100)

    def make(n_each):
        acc, gyr, y = [], [], []
        for c in range(classes):
            for _ in range(n_each):
                f = 1.5 + 1.5 * c + rng.normal(0, 0.1)
                acc.append(np.stack([np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) + 9.8 * (k == 2)
                                     + rng.normal(0, 0.3, t.size) for k in range(3)], axis=1))
                gyr.append(np.stack([np.cos(2 * np.pi * f * t * (1 + k)) + rng.normal(0, 0.3, t.size)
                                     for k in range(2)], axis=1))
                y.append(c)
        return np.array(acc, np.float32), np.array(gyr, np.float32), np.array(y)

    folder.mkdir(parents=True)
    for split, n in (("train", n_per_class), ("test", n_per_class // 2)):
        acc, gyr, y = make(n)
        np.savez(folder / f"{split}.npz", x_accel=acc, x_gyro=gyr, y=y)
    (folder / "modalities.json").write_text(json.dumps({
        "accel": {"kind": "timeseries", "sample_rate": 50}, "gyro": {"kind": "timeseries", "sample_rate": 50}}))
    return folder


def test_generic_format_with_two_timeseries_sensors_learns_end_to_end(tmp_path):
    data = write_imu_dataset(tmp_path / "imu")
    ws = tmp_path / "ws"
    result = invoke("learn", "--data", data, "--classes-per-task", 2, "-w", ws, "--epochs", 5)
    assert result.exit_code == 0, result.output
    assert "Summary" in result.output and "final avg acc" in result.output
    report = json.loads((ws / "report.json").read_text())
    for key in ("accuracy_matrix", "final_average_accuracy", "average_incremental_accuracy", "forgetting"):
        assert key in report
    assert len(report["accuracy_matrix"]) == 2
    assert all("extract_seconds" in t and "train_seconds" in t for t in report["tasks"])
    assert all(t["peak_rss_mb"] > 0 and t["peak_rss_scope"] in ("task", "process") for t in report["tasks"])
    assert "MB resident" in result.output
    # the backbones' one-off export ran before the first task's taps, while the learner was small
    first_shard = min(p.stat().st_mtime_ns for p in (ws / "taps").rglob("shard_*.npz"))
    assert (ws / "backbones" / "backbones.json").stat().st_mtime_ns < first_shard
    assert report["final_average_accuracy"] > 0.6  # 4 classes: chance is 0.25
    # what the learner saved is deployable: predict from the generic-format test file
    pred = invoke("predict", "-w", ws, "-i", data / "test.npz", "--json")
    assert pred.exit_code == 0, pred.output
    labels = json.loads(pred.output)["labels"]
    with np.load(data / "test.npz") as z:
        y = z["y"]
    assert np.mean(np.array(labels, dtype=int) == y) > 0.6


def test_export_force_that_rewrites_the_backbone_files_publishes_the_pack_again(tmp_path):
    """A pack names the backbone files it was made for. When 'export --force' writes the same
    backbones in other bytes than the workspace has (files from another exporter version), the last
    task's pack is published again for them, so the workspace keeps serving and predicting."""
    import onnx

    from mmcl_edge.export.backbone_export import read_index, write_index
    from mmcl_edge.export.onnx_io import sha256_file
    from mmcl_edge.export.pack_export import publish_pack
    from mmcl_edge.workspace import Workspace

    data = write_imu_dataset(tmp_path / "imu", n_per_class=12)
    ws = tmp_path / "ws"
    assert invoke("learn", "--data", data, "--classes-per-task", 2, "-w", ws, "--epochs", 2).exit_code == 0
    index = read_index(ws / "backbones")   # the files as another version wrote them, and a pack made for those
    for e in index["modalities"].values():
        model = onnx.load(str(ws / "backbones" / e["file"]))
        model.doc_string = "written by another version"
        onnx.save_model(model, str(ws / "backbones" / e["file"]))
        e["sha256"] = sha256_file(ws / "backbones" / e["file"])
    write_index(ws / "backbones", index)
    w = Workspace.open(ws)
    publish_pack(w, w.learned_tasks() - 1, w.load_model(w.learned_tasks() - 1))
    assert invoke("predict", "-w", ws, "-i", data / "test.npz", "--json").exit_code == 0
    before = sorted(p.name for p in (ws / "packs").iterdir())

    result = invoke("export", "-w", ws, "--force")
    assert result.exit_code == 0, result.output
    after = sorted(p.name for p in (ws / "packs").iterdir())
    assert len(after) == len(before) + 1 and "published" in result.output
    manifest = json.loads((ws / "packs" / after[-1] / "manifest.json").read_text())
    assert manifest["backbone_files"] == {m: e["sha256"] for m, e in read_index(ws / "backbones")["modalities"].items()}
    pred = invoke("predict", "-w", ws, "-i", data / "test.npz", "--json")
    assert pred.exit_code == 0, pred.output
    from mmcl_edge.runtime import Runtime
    from mmcl_edge.runtime.latency import servable_packs

    files = {m: e["sha256"] for m, e in read_index(ws / "backbones")["modalities"].items()}
    servable = servable_packs(Runtime(ws))                                           # what the benches swap
    assert servable[-1].name == after[-1] and before[-1] not in [p.name for p in servable]
    assert all(json.loads((p / "manifest.json").read_text())["backbone_files"] == files for p in servable)
    assert invoke("export", "-w", ws, "--force").exit_code == 0                      # the same bytes again:
    assert sorted(p.name for p in (ws / "packs").iterdir()) == after                # nothing to publish


def test_task_by_task_invocations_equal_one_run(synthetic_ws, tmp_path):
    """Tasks learned days apart (separate invocations) give the same model as one run: seeded, CPU-deterministic."""
    ws = tmp_path / "ws"
    for k in range(3):
        r = invoke("learn", "--scenario", "synthetic-cil", "-w", ws, "--task", k, "--epochs", 3)
        assert r.exit_code == 0, r.output
    mine = json.loads((ws / "report.json").read_text())
    theirs = json.loads((synthetic_ws.root / "report.json").read_text())
    assert mine["accuracy_matrix"] == theirs["accuracy_matrix"]
    from safetensors.numpy import load_file

    a = load_file(ws / "state" / "task_002.safetensors")
    b = load_file(synthetic_ws.root / "state" / "task_002.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # state is safetensors + JSON only: nothing pickled
    assert {p.suffix for p in (ws / "state").iterdir()} == {".safetensors", ".json"}
    # eval recomputes the same matrix from the saved states
    r = invoke("eval", "-w", ws)
    assert r.exit_code == 0, r.output
    assert json.loads((ws / "report.json").read_text())["accuracy_matrix"] == mine["accuracy_matrix"]


def test_export_info_predict_on_a_workspace(synthetic_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, ws)
    r = invoke("export", "-w", ws)
    assert r.exit_code == 0, r.output
    assert "identity" in r.output
    r = invoke("info", "-w", ws)
    assert r.exit_code == 0, r.output
    for name in ("v0000", "v0001", "v0002", "CPUExecutionProvider"):
        assert name in r.output
    sc = synthetic_ws.scenario()
    np.save(tmp_path / "m0.npy", sc.test.samples["m0"][0])
    np.save(tmp_path / "m1.npy", sc.test.samples["m1"][0])
    r = invoke("predict", "-w", ws, "-i", f"m0={tmp_path / 'm0.npy'}", "-i", f"m1={tmp_path / 'm1.npy'}")
    assert r.exit_code == 0, r.output
    assert "Predictions (pack v0002)" in r.output and "modalities used: m0, m1" in r.output
    r = invoke("predict", "-w", ws, "-i", f"m1={tmp_path / 'm1.npy'}")  # a sensor dropped out
    assert r.exit_code == 0, r.output
    assert "modalities used: m1" in r.output


def test_user_mistakes_give_one_plain_line_and_exit_code_2(synthetic_ws, tmp_path):
    cases = [
        ("learn", "--data", tmp_path / "nowhere", "-w", tmp_path / "a"),
        ("learn", "--scenario", "synthetic-cil", "-w", synthetic_ws.root, "--task", 7),
        ("learn", "--scenario", "no-such-scenario", "-w", tmp_path / "b"),
        ("learn", "--scenario", "synthetic-cil", "-w", tmp_path / "c", "--set", "loss.nope=1"),
        ("predict", "-w", tmp_path / "not-a-workspace", "-i", "x.npz"),
        ("predict", "-w", synthetic_ws.root, "-i", tmp_path / "missing.npz"),
        ("predict", "-w", synthetic_ws.root, "-i", "m0=nothing.npy"),
        ("info", "-w", tmp_path / "not-a-workspace"),
        ("eval", "-w", tmp_path / "not-a-workspace"),
        ("bench", "cl", "--scenario", "synthetic-cil", "--methods", "magic", "--out", tmp_path / "x.json"),
    ]
    for args in cases:
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "error:" in r.output and "Traceback" not in r.output, (args, r.output)


def test_users_own_backbone_learns_exports_and_serves(tmp_path):
    """A user's torch module, declaring its taps and registered by name, goes through learn, export and the runtime."""
    import torch
    from torch import nn

    from mmcl_edge.backbones import TapSpec, TappedBackbone, register_backbone
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.runtime import Runtime
    from mmcl_edge.workspace import Workspace

    class TwoScaleNet(TappedBackbone):
        name = "two-scale-test-net"

        def __init__(self, image_size: int = 16):
            super().__init__()
            self.input_shape = (3, image_size, image_size)
            torch.manual_seed(3)
            self.a = nn.Conv2d(3, 6, 3, 2, 1)
            self.b = nn.Conv2d(6, 12, 3, 2, 1)
            self.taps = (TapSpec("a", 4, 6), TapSpec("b", 1, 12))
            self.freeze()

        def forward(self, x):
            a = torch.relu(self.a(x))
            b = torch.relu(self.b(a))
            return (nn.functional.adaptive_avg_pool2d(a, 2).flatten(2).transpose(1, 2),
                    b.mean(dim=(2, 3)).unsqueeze(1))

    register_backbone(TwoScaleNet.name, TwoScaleNet)
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 30), ("test", 10)):
        y = np.repeat(np.arange(4), n)
        img = rng.normal(0, 0.2, (len(y), 12, 12)).astype(np.float32)
        for i, c in enumerate(y):  # a bright quadrant per class
            img[i, (c // 2) * 6:(c // 2) * 6 + 6, (c % 2) * 6:(c % 2) * 6 + 6] += 1.0
        vec = (np.eye(4)[y] + rng.normal(0, 0.5, (len(y), 4))).astype(np.float32)
        np.savez(data / f"{split}.npz", x_cam=img, x_vec=vec, y=y)
    (data / "modalities.json").write_text(json.dumps({
        "cam": {"kind": "image", "image_size": 16, "backbone": TwoScaleNet.name}, "vec": {"kind": "vector"}}))
    ws = Workspace.create(tmp_path / "ws", {"data": str(data), "setting": "class-il", "classes_per_task": 2},
                          LearnConfig().override({"train.epochs": 5}))
    report = ws.learn()
    assert report["final_average_accuracy"] > 0.5
    index = json.loads((ws.root / "backbones" / "backbones.json").read_text())["modalities"]
    assert index["cam"]["name"] == TwoScaleNet.name and index["cam"]["input_shape"] == [3, 16, 16]
    with np.load(data / "test.npz") as z:
        pred = Runtime(ws.root, providers="cpu").predict({"cam": z["x_cam"], "vec": z["x_vec"]})
        assert np.mean(np.array(pred.labels, dtype=int) == z["y"]) > 0.5
