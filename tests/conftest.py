"""Shared fixtures for the unit tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    """The FSDD recordings folder: ``$MMCL_EDGE_DATA`` if set, else ``<repo>/../shared/data/fsdd/recordings``.

    Skips the test when the folder is absent (the data is never downloaded implicitly).
    """
    env = os.environ.get("MMCL_EDGE_DATA")
    folder = Path(env).expanduser() if env else (REPO_ROOT / ".." / "shared" / "data" / "fsdd" / "recordings").resolve()
    if not folder.is_dir():
        pytest.skip("FSDD recordings not found: set MMCL_EDGE_DATA or put them in ../shared/data/fsdd/recordings")
    return folder


@pytest.fixture
def single_thread():
    """Run a test on one torch thread: tiny tensors gain nothing from more, and on a small shared
    machine extra threads contend with other work and make the test many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_workspace(root: Path, scenario: str, data_dir: Path | None = None, epochs: int = 3, learn: bool = True,
                   seed: int = 0):
    """A real workspace: learned task by task, with exported backbones and one pack per task."""
    from mmcl_edge.config import LearnConfig
    from mmcl_edge.workspace import Workspace

    source = {"scenario": scenario, "data_dir": str(data_dir) if data_dir else None, "seed": seed}
    ws = Workspace.create(root, source, LearnConfig().override({"train.epochs": epochs}))
    if learn:
        ws.learn()
    return ws


@pytest.fixture(scope="session")
def synthetic_ws(tmp_path_factory):
    """Three class-IL tasks on two vector modalities: packs v0000..v0002 (seconds to build)."""
    return make_workspace(tmp_path_factory.mktemp("synthetic") / "ws", "synthetic-cil")


@pytest.fixture(scope="session")
def avdigits_ws(tmp_path_factory, fsdd_dir):
    """AV-Digits class-IL, all five tasks, EfficientNet-Lite0 backbones (about a minute on 2 cores)."""
    return make_workspace(tmp_path_factory.mktemp("avdigits") / "ws", "avdigits-cil", fsdd_dir)
