"""The service's durable inbox of labelled samples, and the learn jobs made from it (torch-free).

    WS/inbox/pending/<seq>-<id>.npz     one acknowledged request: x_<modality> [B, ...],
                                        present_<modality> [B], label (a class name)
    WS/inbox/jobs/<job>/                the samples a learn request took, and state.json:
                                        {"id", "state": queued|learning|published|refused|failed, ...}

A request is acknowledged only after its file is written, fsynced and renamed into ``pending``
(and the folder fsynced), so a server killed at any moment loses no acknowledged sample. A learn
request moves every pending file into a new job folder (renames: atomic), so samples that arrive
while a job learns wait for the next one. The learner (``mmcl_edge.teaching``) reads jobs in order.
"""
from __future__ import annotations

import itertools
import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from mmcl_edge.runtime import layout
from mmcl_edge.runtime.errors import RuntimeUserError

PENDING_DIR = "pending"
JOBS_DIR = "jobs"
JOB_STATE_FILE = "state.json"
JOB_STATES = ("queued", "learning", "published", "refused", "failed")
DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_MAX_SAMPLES = 20_000


class InboxFull(RuntimeUserError):
    """The inbox holds as much as it may: ask the service to learn (or raise the limit) first."""


class Inbox:
    def __init__(self, workspace, max_bytes: int = DEFAULT_MAX_BYTES, max_samples: int = DEFAULT_MAX_SAMPLES):
        self.root = Path(workspace) / layout.INBOX_DIR
        self.pending = self.root / PENDING_DIR
        self.jobs = self.root / JOBS_DIR
        self.max_bytes, self.max_samples = int(max_bytes), int(max_samples)
        self._lock = threading.Lock()
        self._seq = itertools.count(int(time.time() * 1000))

    # samples ---------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        if not self.pending.is_dir():
            return []
        return sorted(p for p in self.pending.iterdir() if p.suffix == ".npz" and not p.name.startswith(layout.TMP_PREFIX))

    def usage(self) -> dict:
        files = self._files()
        samples = sum(int(p.name.split("-")[2].split(".")[0]) for p in files)
        return {"files": len(files), "samples": samples, "bytes": sum(p.stat().st_size for p in files)}

    def append(self, samples: dict[str, np.ndarray], present: dict[str, np.ndarray], label: str) -> dict:
        """Store one request's samples (batch-first arrays, one label for all of them) durably."""
        label = str(label).strip()
        if not label:
            raise RuntimeUserError("parameters.label must name the class of the samples")
        n = len(next(iter(present.values())))
        arrays = {f"x_{m}": np.ascontiguousarray(x) for m, x in samples.items()}
        arrays.update({f"present_{m}": np.asarray(p, bool) for m, p in present.items()})
        arrays["label"] = np.array(label)
        size = sum(a.nbytes for a in arrays.values())
        with self._lock:  # the capacity check and the write are one step for concurrent requests
            used = self.usage()
            if used["samples"] + n > self.max_samples or used["bytes"] + size > self.max_bytes:
                raise InboxFull(f"the inbox is full ({used['samples']} samples, {used['bytes'] >> 20} MiB; limits "
                                f"{self.max_samples} samples, {self.max_bytes >> 20} MiB): ask the service to learn "
                                "them first (POST /v2/models/mmcl/learn)")
            path = self.pending / f"{next(self._seq):016d}-{uuid.uuid4().hex[:8]}-{n}.npz"
            layout.atomic_write(path, lambda tmp: _savez(tmp, arrays))
        return {"accepted": n, "label": label, "inbox_samples": used["samples"] + n}

    # jobs ------------------------------------------------------------------------------------
    def start_job(self) -> str:
        """Move every pending sample into a new queued job; returns its id."""
        with self._lock:
            files = self._files()
            if not files:
                raise RuntimeUserError("the inbox is empty: post labelled samples to /v2/models/mmcl/samples first")
            job = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
            folder = self.jobs / job
            folder.mkdir(parents=True)
            self._write_state(job, {"id": job, "state": "queued", "samples": self.usage()["samples"],
                                    "created": time.time()})
            for f in files:
                os.replace(f, folder / f.name)
            layout.fsync_dir(folder)
            layout.fsync_dir(self.pending)
        return job

    def _write_state(self, job: str, state: dict) -> None:
        layout.atomic_write_json(self.jobs / job / JOB_STATE_FILE, state)

    def state(self, job: str) -> dict | None:
        path = self.jobs / job / JOB_STATE_FILE
        if not _JOB_ID_OK(job) or not path.is_file():
            return None
        return json.loads(path.read_text())

    def set_state(self, job: str, state: str, **extra) -> dict:
        assert state in JOB_STATES
        doc = {**(self.state(job) or {"id": job}), "state": state, "updated": time.time(), **extra}
        self._write_state(job, doc)
        return doc

    def queued(self) -> list[str]:
        if not self.jobs.is_dir():
            return []
        return sorted(j.name for j in self.jobs.iterdir() if (self.state(j.name) or {}).get("state") == "queued")

    def read_job(self, job: str) -> tuple[dict[str, list], list[str]]:
        """A job's samples as {modality: [array or None]} and their labels, in arrival order."""
        samples: dict[str, list] = {}
        labels: list[str] = []
        for f in sorted((self.jobs / job).glob("*.npz")):
            with np.load(f, allow_pickle=False) as z:
                label = str(z["label"])
                mods = [k[2:] for k in z.files if k.startswith("x_")]
                n = len(z[f"present_{mods[0]}"])
                for m in mods:
                    x, p = z[f"x_{m}"], z[f"present_{m}"]
                    samples.setdefault(m, [None] * len(labels)).extend(x[i] if p[i] else None for i in range(n))
                for m in samples:
                    if m not in mods:
                        samples[m].extend([None] * n)
                labels.extend([label] * n)
        return samples, labels


def _JOB_ID_OK(job: str) -> bool:
    return bool(job) and all(c.isalnum() or c in "-T" for c in job) and len(job) < 64


def _savez(tmp: Path, arrays: dict) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
