"""The teaching routes of ``serve --teach``: labelled samples into the durable inbox, and learn jobs.

    POST /v2/models/{name}/samples       the tensors of an ``infer`` request + ``parameters.label``
    POST /v2/models/{name}/learn         {} -> {"id": job}; the inbox becomes one task
    GET  /v2/models/{name}/learn/{id}    {"id", "state": queued|learning|published|refused|failed, ...}

Only a holder of the token may change what the robot believes: every route needs
``Authorization: Bearer <token>`` (401 without, 403 with a wrong one); inference stays open. Jobs
are learned by one learner process at a time (``python -m mmcl_edge.teaching --inbox WS``), under
the workspace lock and the thread policy, while this process keeps serving; the published pack
reaches the service through its watcher, like any other new pack.
"""
from __future__ import annotations

import hmac
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from mmcl_edge.runtime.errors import RuntimeUserError
from mmcl_edge.runtime.inbox import Inbox, InboxFull


@dataclass
class TeachSettings:
    token: str
    max_bytes: int
    max_samples: int
    max_forgetting: float = 5.0
    holdout: float | None = None
    warm: bool = False  # keep the learner process started and waiting (no start-up cost per job)


def read_token(path) -> str:
    """The teaching token: the first line of a file (keep it 0600); an empty or missing file is refused."""
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise RuntimeUserError(f"cannot read the teaching token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise RuntimeUserError(f"the teaching token in {path} must be at least 16 characters "
                               "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > token)")
    return token


class Learner:
    """The one learner process: started when a job is queued and none is running; or, ``warm``,
    started with the service and kept waiting for jobs (PyTorch, the workspace and its backbones
    already loaded: about 5 s less per job, at the cost of the learner's memory while idle)."""

    def __init__(self, workspace: Path, settings: TeachSettings):
        self.workspace, self.settings = Path(workspace), settings
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def ensure(self, inbox: Inbox) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            if not inbox.queued() and not self.settings.warm:
                return
            from mmcl_edge import threads

            cmd = [sys.executable, "-m", "mmcl_edge.teaching", "--inbox", str(self.workspace),
                   "--max-forgetting", str(self.settings.max_forgetting)]
            if self.settings.holdout:
                cmd += ["--holdout", str(self.settings.holdout)]
            if self.settings.warm:
                cmd += ["--wait"]
            self._proc = subprocess.Popen(cmd, env=threads.child_env(), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        """A waiting (warm) learner is asked to end after the job it may be learning; an on-demand
        one ends by itself when the inbox is empty."""
        if self._proc is not None and self._proc.poll() is None:
            if self.settings.warm:
                self._proc.terminate()
            self._proc.wait()


def add_teach_routes(app: FastAPI, runtime, workspace: Path, settings: TeachSettings, read_request, check_model,
                     error) -> Learner:
    """Add the teaching routes to ``app``. ``read_request(request) -> {modality: batch array}`` is the
    inference route's own decoder (same limits, same checks)."""
    inbox = Inbox(workspace, settings.max_bytes, settings.max_samples)
    learner = Learner(workspace, settings)
    for job in (inbox.jobs.iterdir() if inbox.jobs.is_dir() else []):  # a learner killed with its server
        if (inbox.state(job.name) or {}).get("state") == "learning":
            inbox.set_state(job.name, "queued", note="re-queued: the learner stopped before it finished")
    learner.ensure(inbox)

    def refused(request: Request, name: str) -> JSONResponse | None:
        """None when the request holds the token and names this model; else the answer to give."""
        denied = authorised(request)
        if denied is None:
            check_model(name)
        return denied

    def authorised(request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization") or ""
        if not header.lower().startswith("bearer "):
            return JSONResponse({"error": "teaching needs 'Authorization: Bearer <token>'"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(header[7:].strip().encode(), settings.token.encode()):
            return JSONResponse({"error": "the teaching token is wrong"}, status_code=403)
        return None

    @app.post("/v2/models/{name}/samples", name="samples")
    async def samples(name: str, request: Request):
        if (denied := refused(request, name)) is not None:
            return denied
        req, arrays = await read_request(request)
        label = (req.get("parameters") or {}).get("label") if isinstance(req.get("parameters"), dict) else None
        if not isinstance(label, str) or not label.strip():
            return error("parameters.label must be a non-empty class name (a string)", 400)
        def store():  # checks, stacking and the fsynced write: off the event loop
            batches = runtime.validate({m: list(a) for m, a in arrays.items()})
            n = len(next(iter(batches.values())))
            stacked = {m: np.stack(b) for m, b in batches.items()}
            return inbox.append(stacked, {m: np.ones(n, bool) for m in batches}, label)

        try:
            ack = await run_in_threadpool(store)
        except InboxFull as exc:
            return error(str(exc), 409)
        except RuntimeUserError as exc:
            return error(str(exc), 400)
        except OSError as exc:
            return error(f"the inbox cannot store the samples: {exc.strerror}", 507)
        return ack

    @app.post("/v2/models/{name}/learn", name="learn")
    async def learn(name: str, request: Request):
        if (denied := refused(request, name)) is not None:
            return denied
        try:
            job = await run_in_threadpool(inbox.start_job)
        except RuntimeUserError as exc:
            return error(str(exc), 409)
        learner.ensure(inbox)
        return {"id": job, "state": "queued"}

    @app.get("/v2/models/{name}/learn/{job}", name="learn_state")
    def learn_state(name: str, job: str, request: Request):
        if (denied := refused(request, name)) is not None:
            return denied
        state = inbox.state(job)
        if state is None:
            return error(f"no learn job {job!r}", 404)
        learner.ensure(inbox)  # a job queued while the last learner was finishing
        return state

    return learner
