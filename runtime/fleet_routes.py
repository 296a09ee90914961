"""The read-only routes through which a fleet moves packs (every ``serve`` has them, a follower too).

    GET /v2/models/{name}/packs                 {"serving", "versions", "workspace_id", "backbones_sha256"}
        ?after=N&wait=S                         long poll: answers as soon as the serving version passes N
        &member=ID&port=P                       a follower registers (what ``/fleet`` shows)
    GET /v2/models/{name}/packs/{version}       one pack as one archive (``archive.py``); ``Range`` resumes
    GET /v2/models/{name}/backbones             the exact bytes of ``backbones.json``
    GET /v2/models/{name}/backbones/{file}      a file it lists (ONNX backbone, tokenizer)
    GET /v2/models/{name}/fleet                 members that registered: the version each serves, how far behind

Nothing here writes to the workspace or changes what serves: a follower verifies what it fetches
exactly as a local pack is verified (``Runtime.swap``). The serving version is announced, not the
newest folder: a pack this server refused is never offered.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import OrderedDict

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from mmcl_edge.runtime import archive, layout
from mmcl_edge.runtime.backbones import INDEX_FILE

MAX_WAIT = 30.0        # seconds a long poll may hold its connection
MAX_MEMBERS = 256      # registered followers remembered (oldest forgotten first)
CACHED_ARCHIVES = 4
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class FleetState:
    """Archives built once per version, and the members that registered."""

    def __init__(self, runtime):
        self.runtime = runtime
        self._archives: OrderedDict[int, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()
        self.members: OrderedDict[str, dict] = OrderedDict()
        self.follower = None  # set by a follower (``follower.Follower``): its leader and lag, in ``packs``

    def archive(self, version: int) -> tuple[bytes, str] | None:
        with self._lock:
            if version in self._archives:
                self._archives.move_to_end(version)
                return self._archives[version]
        folder = self.runtime.root / layout.PACKS_DIR / layout.pack_name(version)
        if folder.is_symlink() or not folder.is_dir():
            return None
        data = archive.pack_archive(folder)
        entry = (data, archive.sha256(data))
        with self._lock:
            self._archives[version] = entry
            while len(self._archives) > CACHED_ARCHIVES:
                self._archives.popitem(last=False)
        return entry

    def register(self, member: str, address: str | None, port: int | None, serving: int | None) -> None:
        now = time.time()
        leader = self.runtime.pack.version
        with self._lock:
            old = self.members.pop(member, {})
            behind_since = old.get("behind_since") if serving is not None and serving < leader else None
            if serving is not None and serving < leader and behind_since is None:
                behind_since = now
            self.members[member] = {"member": member, "url": f"http://{address}:{port}" if address and port else None,
                                    "serving": serving, "seen": now, "behind_since": behind_since}
            while len(self.members) > MAX_MEMBERS:
                self.members.popitem(last=False)

    def fleet(self) -> dict:
        now, leader = time.time(), self.runtime.pack.version
        with self._lock:
            members = [dict(m) for m in self.members.values()]
        for m in members:
            since = m.pop("behind_since")
            m["behind_versions"] = None if m["serving"] is None else max(0, leader - m["serving"])
            m["behind_seconds"] = round(now - since, 3) if m["behind_versions"] and since is not None else 0.0
            m["last_seen_seconds"] = round(now - m.pop("seen"), 3)
        return {"serving": leader, "members": members}


def listing(runtime, follower=None) -> dict:
    index = runtime.backbones.folder / INDEX_FILE
    body = {"serving": runtime.pack.version, "versions": layout.pack_versions(runtime.root),
            "workspace_id": runtime.policy.workspace_id,
            "backbones_sha256": archive.sha256(index.read_bytes()) if index.is_file() else None}
    if follower is not None:
        body["follows"] = follower.status()
    return body


def add_fleet_routes(app: FastAPI, runtime, check_model, error) -> FleetState:
    state = FleetState(runtime)

    # out of the OpenAPI schema (which only the fuzz test reads): random 'wait' values would hold it 30 s each
    @app.get("/v2/models/{name}/packs", name="packs", include_in_schema=False)
    async def packs(name: str, request: Request, after: int = -1, wait: float = 0.0, member: str = "",
                    port: int = 0, serving: int = -1):
        check_model(name)
        if member:
            client = request.client.host if request.client else None
            state.register(member[:200], client, port or None, serving if serving >= 0 else None)
        end = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
        while runtime.pack.version <= after and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return await run_in_threadpool(listing, runtime, state.follower)

    @app.get("/v2/models/{name}/packs/{version}", name="pack_archive")
    async def pack_archive(name: str, version: str, request: Request):
        check_model(name)
        m = layout.PACK_NAME.match(version) or re.match(r"^(\d{1,9})$", version)
        if not m:
            return error(f"a pack version is an integer or vNNNN, not {version[:40]!r}", 400)
        found = await run_in_threadpool(state.archive, int(m.group(1)))
        if found is None:
            return error(f"no pack {version} here; GET .../packs lists them", 404)
        data, digest = found
        headers = {"ETag": f'"{digest}"', "Accept-Ranges": "bytes", "x-mmcl-archive-sha256": digest,
                   "x-mmcl-pack-version": str(int(m.group(1)))}
        wanted = RANGE.match(request.headers.get("range", ""))
        if_range = request.headers.get("if-range")
        if wanted and (if_range is None or if_range.strip('"') == digest):
            start = int(wanted.group(1))
            end = min(int(wanted.group(2)), len(data) - 1) if wanted.group(2) else len(data) - 1
            if start >= len(data) or end < start:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return Response(data[start:end + 1], status_code=206, media_type=archive.MEDIA_TYPE, headers=headers)
        return Response(data, media_type=archive.MEDIA_TYPE, headers=headers)

    def backbone_files() -> dict[str, str]:
        index = json.loads((runtime.backbones.folder / INDEX_FILE).read_text())["modalities"]
        files = {}
        for e in index.values():
            files[e["file"]] = e["sha256"]
            if e.get("tokenizer"):
                files[e["tokenizer"]["file"]] = e["tokenizer"]["sha256"]
        return files

    @app.get("/v2/models/{name}/backbones", name="backbones")
    async def backbones(name: str):
        check_model(name)
        data = await run_in_threadpool((runtime.backbones.folder / INDEX_FILE).read_bytes)
        return Response(data, media_type="application/json")

    @app.get("/v2/models/{name}/backbones/{file}", name="backbone_file")
    async def backbone_file(name: str, file: str):
        check_model(name)
        files = await run_in_threadpool(backbone_files)
        if file not in files:
            return error(f"{file[:80]!r} is not a file backbones.json lists", 404)
        return FileResponse(runtime.backbones.folder / file, media_type="application/octet-stream",
                            headers={"x-mmcl-sha256": files[file]})

    @app.get("/v2/models/{name}/fleet", name="fleet")
    def fleet(name: str):
        check_model(name)
        return JSONResponse(state.fleet())

    return state
