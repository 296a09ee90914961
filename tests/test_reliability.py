"""Issue #9, part A-C: one transaction per task, the workspace lock, atomic writes, strict config and names."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmcl_edge.cli.main import app
from mmcl_edge.config import LearnConfig
from mmcl_edge.errors import ConfigError, DataFormatError, MMCLError, WorkspaceError, WorkspaceLocked
from mmcl_edge.runtime import layout
from mmcl_edge.workspace import Workspace

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def copy_ws(synthetic_ws, tmp_path) -> Path:
    dst = tmp_path / "ws"
    shutil.copytree(synthetic_ws.root, dst)
    return dst


def current_task(root: Path) -> int:
    name = layout.read_current(root)
    return json.loads((root / "packs" / name / "manifest.json").read_text())["task"]


def test_error_hierarchy_has_one_base():
    from mmcl_edge.data import DataFormatError as D
    from mmcl_edge.runtime import InputError, PackRejected, RuntimeUserError
    from mmcl_edge.workspace import WorkspaceError as W

    for cls in (D, W, RuntimeUserError, PackRejected, InputError, ConfigError, WorkspaceLocked):
        assert issubclass(cls, MMCLError)
    assert issubclass(D, ValueError) and issubclass(InputError, ValueError)


def test_killed_between_state_and_publish_is_finished_by_learn(synthetic_ws, tmp_path):
    """Old code: the last state is saved but its pack and report row are not; learn said 'all learned'."""
    root = copy_ws(synthetic_ws, tmp_path)
    # simulate the kill: task 2's pack and report row never happened
    shutil.rmtree(root / "packs" / "v0002")
    layout.set_current(root, "v0001")
    report = json.loads((root / "report.json").read_text())
    report["accuracy_matrix"], report["tasks"] = report["accuracy_matrix"][:2], report["tasks"][:2]
    (root / "report.json").write_text(json.dumps(report))
    r = invoke("learn", "--scenario", "synthetic-cil", "-w", root, "--epochs", 3)
    assert r.exit_code == 0, r.output
    assert "recovered" in r.output and "published" in r.output
    assert current_task(root) == 2
    assert len(json.loads((root / "report.json").read_text())["accuracy_matrix"]) == 3
    # and the recovered report equals the one of the uninterrupted run
    assert (json.loads((root / "report.json").read_text())["accuracy_matrix"]
            == json.loads((synthetic_ws.root / "report.json").read_text())["accuracy_matrix"])


def test_export_publishes_the_missing_pack_of_the_last_task(synthetic_ws, tmp_path):
    root = copy_ws(synthetic_ws, tmp_path)
    shutil.rmtree(root / "packs" / "v0002")
    layout.set_current(root, "v0001")  # current exists but names an older task's pack
    r = invoke("export", "-w", root)
    assert r.exit_code == 0, r.output
    assert current_task(root) == 2


def test_uncommitted_state_is_rolled_back(synthetic_ws, tmp_path):
    """Weights without their JSON commit record (killed mid-save) are removed, and the task re-learned."""
    root = copy_ws(synthetic_ws, tmp_path)
    ws = Workspace.open(root)
    weights, meta = ws.state_paths(2)
    meta.unlink()
    (root / "state" / ".tmp-task_002.json.123").write_text("{")
    notes = ws.recover()
    assert any("rolled back" in n for n in notes) and any("temporary" in n for n in notes)
    assert not weights.exists() and ws.learned_tasks() == 2
    assert len(ws.report()["accuracy_matrix"]) == 2  # the report row of the uncommitted task is dropped


def test_corrupt_state_file_is_one_error_line(synthetic_ws, tmp_path):
    root = copy_ws(synthetic_ws, tmp_path)
    (root / "state" / "task_001.json").write_text("")  # what a full disk left behind with the old code
    for args in (("eval", "-w", root), ("learn", "--scenario", "synthetic-cil", "-w", root, "--task", 2, "--force")):
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        assert "error:" in r.output and "Traceback" not in r.output and "corrupt" in r.output


def test_corrupt_workspace_json_is_one_error_line(synthetic_ws, tmp_path):
    root = copy_ws(synthetic_ws, tmp_path)
    (root / "workspace.json").write_text("{ nope")
    r = invoke("eval", "-w", root)
    assert r.exit_code == 2 and "corrupt" in r.output and "Traceback" not in r.output


def test_atomic_write_leaves_old_file_when_disk_refuses(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse large writes (EFBIG), like a full disk: the old file stays whole."""
    target = tmp_path / "state.json"
    target.write_text(json.dumps({"old": True}))
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
from mmcl_edge.runtime import layout
from mmcl_edge.errors import StorageError
try:
    layout.atomic_write_json({str(target)!r}, {{"x": "y" * 5000}})
except StorageError as exc:
    print("STORAGE", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "STORAGE" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left


def test_learn_on_a_full_disk_is_one_line_and_nothing_half_written(synthetic_ws, tmp_path):
    root = copy_ws(synthetic_ws, tmp_path)
    state = root / "state"
    for p in state.glob("task_002.*"):
        p.unlink()
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from mmcl_edge.cli.main import app\n"
        "sys.argv = ['mmcl-edge', 'learn', '--scenario', 'synthetic-cil', '-w', sys.argv[1], '--epochs', '3']\n"
        "app()\n")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not [p for p in state.iterdir() if p.stat().st_size == 0]
    assert not (state / "task_002.json").exists()
    assert Workspace.open(root).learned_tasks() == 2
    # with room again, learn finishes the stream
    r = invoke("learn", "--scenario", "synthetic-cil", "-w", root, "--epochs", 3)
    assert r.exit_code == 0, r.output
    assert current_task(root) == 2


def test_second_writer_fails_at_once_with_a_clear_message(synthetic_ws, tmp_path):
    root = copy_ws(synthetic_ws, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom mmcl_edge.runtime import layout\n"
        "with layout.workspace_lock(sys.argv[1], 'learn'):\n    print('held', flush=True)\n    time.sleep(60)\n"),
        str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = invoke("learn", "--scenario", "synthetic-cil", "-w", root, "--task", 2, "--force", "--epochs", 3)
        assert r.exit_code == 2 and "in use" in r.output and f"pid {holder.pid}" in r.output, r.output
        with pytest.raises(WorkspaceLocked):
            Workspace.open(root).evaluate()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the lock with the killed holder: no stale lock
    with layout.workspace_lock(root):
        pass


def test_current_must_name_a_pack_folder():
    for bad in ("../../etc", "/etc/passwd", "v0001/../../x", "packs/v0001", "v1"):
        with pytest.raises(MMCLError):
            layout.check_pack_name(bad)
    assert layout.check_pack_name("v0003\n") == "v0003"


def test_config_is_strict():
    c = LearnConfig().override({"freeze.enabled": "False", "encoder.cross_modal_routing": "false",
                                "train.epochs": "5", "loss.align": 0})
    assert c.freeze.enabled is False and c.encoder.cross_modal_routing is False and c.train.epochs == 5
    for bad in ({"freeze.enabled": "yes"}, {"head": "magic"}, {"loss.ce_scope": "some"}, {"train.epochs": "abc"},
                {"train.epochs": 2.5}, {"train.lr": -1}, {"encoder.top_k": 99}, {"loss.nope": 1}, {"nope": 1}):
        with pytest.raises(ConfigError):
            LearnConfig().override(bad)
    with pytest.raises(ConfigError, match="unknown"):
        LearnConfig.from_dict({"loss": {"align": 0.1, "typo": 1}})


def test_options_on_an_existing_workspace_apply_from_the_next_task(synthetic_ws, tmp_path):
    root = copy_ws(synthetic_ws, tmp_path)
    for p in (root / "state").glob("task_002.*"):
        p.unlink()
    r = invoke("learn", "--scenario", "synthetic-cil", "-w", root, "--epochs", 2, "--set", "freeze.enabled=False")
    assert r.exit_code == 0, r.output
    assert "applies from task 2" in r.output
    meta = json.loads((root / "workspace.json").read_text())
    assert meta["config"]["train"]["epochs"] == 2 and meta["config"]["freeze"]["enabled"] is False
    assert meta["config_changes"][-1]["from_task"] == 2
    assert meta["config_changes"][-1]["set"] == {"train.epochs": 2, "freeze.enabled": False}
    r = invoke("learn", "--scenario", "synthetic-cil", "-w", root, "--task", 2, "--force", "--set", "encoder.width=64")
    assert r.exit_code == 2 and "cannot change after a task is learned" in r.output


def write_data(folder: Path, name="accel", kind="timeseries", x=None, opts=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 50, 3)).astype(np.float32) if x is None else x
    y = np.arange(len(x)) % 2
    for split in ("train", "test"):
        np.savez(folder / f"{split}.npz", **{f"x_{name}": x, "y": y})
    (folder / "modalities.json").write_text(json.dumps({name: {"kind": kind, **(opts or {})}}))
    return folder


@pytest.mark.parametrize("name,opts,match", [
    ("../../x", {}, "plain identifier"), ("a__b", {}, "plain identifier"),
    ("cam", {"image_size": 0}, "image_size"), ("accel", {"series_length": "abc"}, "series_length"),
])
def test_bad_modality_names_and_options_are_data_errors(tmp_path, name, opts, match):
    from mmcl_edge.data.generic import load_generic

    write_data(tmp_path / "d", name=name, kind="image" if name == "cam" else "timeseries",
               x=np.zeros((8, 12, 12), np.float32) if name == "cam" else None, opts=opts)
    with pytest.raises(DataFormatError, match=match):
        load_generic(tmp_path / "d")


def test_series_with_fewer_steps_than_channels_warns(tmp_path):
    from mmcl_edge.data.generic import DataLayoutWarning, load_generic

    write_data(tmp_path / "d", x=np.random.default_rng(0).normal(size=(8, 3, 50)).astype(np.float32))
    with pytest.warns(DataLayoutWarning, match="transpose"):
        load_generic(tmp_path / "d")


def test_empty_test_split_is_a_data_error(tmp_path):
    from mmcl_edge.data.generic import load_generic

    d = write_data(tmp_path / "d")
    np.savez(d / "test.npz", x_accel=np.zeros((0, 50, 3), np.float32), y=np.zeros(0, int))
    with pytest.raises(DataFormatError, match="no samples"):
        load_generic(d)


# issue #16: a full file system and unreadable files, each one line naming the path ------------------
@pytest.fixture
def small_fs(tmp_path):
    """A real file system of 8 MiB (tmpfs), mounted for the test; skipped where mounting is not allowed."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(fs: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the file system's free space."""
    st = os.statvfs(fs)
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def learn_on(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmcl_edge.cli.main", "learn", "--scenario", "synthetic-cil", "-w",
                           str(root), "--epochs", "3"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"})


@pytest.mark.parametrize("stage", ["state", "taps"])
def test_full_file_system_is_one_line_naming_the_file_and_leaves_no_temporary(synthetic_ws, small_fs, stage):
    """Old code: a SafetensorError traceback during the state save; 'cannot write : No space left on
    device' (no path) during tap extraction, with a taps/*/shard_*.tmp.npz left behind."""
    root = small_fs / "ws"
    shutil.copytree(synthetic_ws.root, root)
    # back to the workspace as it was after task 1, so that learn's first write is task 2's
    for p in (*(root / "state").glob("task_002.*"), layout.heldout_path(root, 2)):
        p.unlink(missing_ok=True)
    shutil.rmtree(root / "packs" / "v0002")
    layout.set_current(root, "v0001")
    report = json.loads((root / "report.json").read_text())
    report["accuracy_matrix"], report["tasks"] = report["accuracy_matrix"][:2], report["tasks"][:2]
    (root / "report.json").write_text(json.dumps(report))
    if stage == "taps":  # the last task's taps are gone: they are extracted again, and the shard is refused
        shutil.rmtree(root / "taps")
    fill(small_fs, leave=100 << 10 if stage == "state" else 2 << 10)  # the state is ~1 MB, a shard ~5 KB
    proc = learn_on(root)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "Traceback" not in proc.stderr, \
        proc.stderr
    assert "No space left on device" in lines[0]
    named = lines[0].split("cannot write ", 1)[1].split(":")[0]
    assert named.startswith(str(root / ("state" if stage == "state" else "taps"))), lines[0]
    assert not [p for p in root.rglob("*") if ".tmp" in p.name], list(root.rglob("*tmp*"))
    assert Workspace.open(root).learned_tasks() == 2
    (small_fs / "filler").unlink()  # with room again, learn finishes the stream
    assert learn_on(root).returncode == 0 and current_task(root) == 2


def run_unprivileged(*args) -> subprocess.CompletedProcess:
    """The CLI without the power to read what file permissions forbid (root drops CAP_DAC_*)."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv (util-linux) to drop root's file-permission override")
        prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search"]
    return subprocess.run([*prefix, sys.executable, "-m", "mmcl_edge.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"})


@pytest.mark.parametrize("target,command", [("packs/v0002/pack.onnx", "predict"), ("workspace.json", "eval"),
                                            ("backbones/m0.onnx", "predict"), ("state/task_002.safetensors", "eval")])
def test_an_unreadable_file_is_cannot_read(synthetic_ws, tmp_path, target, command):
    """Old code: 'cannot write <path>: Permission denied' for a file that could not be read."""
    root = copy_ws(synthetic_ws, tmp_path)
    sc = synthetic_ws.scenario()
    np.savez(tmp_path / "x.npz", **{f"x_{m}": np.stack(sc.test.samples[m][:2]) for m in sc.specs})
    (root / target).chmod(0)
    proc = run_unprivileged(command, "-w", root, *(("-i", tmp_path / "x.npz") if command == "predict" else ()))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: cannot read {root / target}: Permission denied" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "cannot write" not in proc.stderr


def test_a_symlink_loop_as_the_workspace_is_one_line(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for args in (("info", "-w", loop), ("eval", "-w", loop), ("predict", "-w", loop, "-i", "x.npz")):
        r = invoke(*args)
        assert r.exit_code == 2 and "error:" in r.output and "loop" in r.output.lower(), (args, r.output)


def test_learning_keeps_no_backbone_and_exports_them_in_a_child(tmp_path, monkeypatch):
    """Memory (#19): the PyTorch backbones live only while taps are extracted, and their ONNX
    export runs in a child process (the dynamo exporter's modules never stay in the learner)."""
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.export import backbone_export
    from mmcl_edge.workspace import Workspace

    def not_here(*args, **kwargs):
        raise AssertionError("a backbone was exported in the learner's own process")

    monkeypatch.setattr(backbone_export, "export_backbone", not_here)
    ws = Workspace.open_or_create(tmp_path / "ws", {"scenario": "synthetic-cil", "seed": 0},
                                  LearnConfig().override({"train.epochs": 1}))
    ws.learn(task=0)
    assert ws.tap_source()._backbones is None
    assert not backbone_export.verify_index(ws.root / "backbones")
    assert set(backbone_export.read_index(ws.root / "backbones")["modalities"]) == set(ws.specs)
