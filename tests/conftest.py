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
