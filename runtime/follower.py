"""A follower: a device that serves what a leader learned, from its own folder (``serve --follow``).

    f = Follower("DIR", "http://10.0.0.1:8000", trusted_keys=["leader.pub"])
    rt = f.bootstrap()        # backbones fetched once (hash-checked), a first pack verified and serving
    f.start()                 # long-polls the leader; each new pack: download, verify, swap, then commit

No learner and no PyTorch: the stdlib's HTTP client and the runtime. Every pack goes through
``Runtime.swap`` (signature, hashes, identity, graph check, warm-up), the same code as a local pack;
only then is it renamed into ``DIR/packs`` and named by ``DIR/current``. A download lands in
``DIR/downloads`` (resumed with ``Range`` against the archive's sha256, restarted when the leader's
archive changed) and is checked against the sha256 the leader announced before it is opened. When the
leader is unreachable or sends a bad pack the follower keeps serving its last good pack. Versions
never go back: the highest version served is the floor, kept in ``DIR/follow.json`` across restarts.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mmcl_edge.runtime import archive, layout
from mmcl_edge.runtime.backbones import INDEX_FILE
from mmcl_edge.runtime.errors import PackRejected, RuntimeUserError
from mmcl_edge.runtime.pack import MANIFEST_FILE, sha256_file
from mmcl_edge.runtime.service import Runtime

log = logging.getLogger("mmcl_edge.follower")
BLOCK = 1 << 16


class TransferError(Exception):
    """The leader did not answer (``unreachable``), or a download did not arrive whole (cut, or not
    the bytes announced): retried, never opened."""

    def __init__(self, message: str, kind: str = "unreachable"):
        super().__init__(message)
        self.kind = kind


class Follower:
    """Keeps ``root`` (backbones, packs, current) a verified copy of what the leader serves."""

    def __init__(self, root, leader: str, model_name: str = "mmcl", *, trusted_keys=None, providers=None,
                 threads: int = 0, wait: float = 5.0, member: str | None = None, port: int | None = None,
                 warmup_seconds: float = 10.0, connect_timeout: float = 3.0):
        self.root = layout.resolve_root(root)
        if (self.root / layout.WORKSPACE_FILE).is_file():
            raise RuntimeUserError(f"{self.root} is a learner's workspace; a follower keeps its own folder "
                                   "(give serve --follow a new -w folder)")
        self.leader = leader.rstrip("/")
        self.base = f"{self.leader}/v2/models/{urllib.parse.quote(model_name)}"
        self.trusted_keys = trusted_keys or []
        self.providers, self.threads, self.wait = providers, threads, wait
        self.warmup_seconds, self.connect_timeout = warmup_seconds, connect_timeout
        self.member = member or f"{socket.gethostname()}:{port or 0}:{os.getpid()}"
        self.port = port
        self.runtime: Runtime | None = None
        self.state = self._read_state()
        self.leader_version: int | None = None
        self.behind_since: float | None = None
        self.last_contact: float | None = None
        self.last_error: str | None = None
        self.backbones_changed = False  # the leader's backbones.json differs: a restart fetches the new ones
        self.counts = {"fetched": 0, "refused": 0, "transfer_errors": 0, "unreachable": 0}
        self._refused_until: dict[int, float] = {}
        self._refusals: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # the follower's own record ----------------------------------------------------------------
    def _read_state(self) -> dict:
        path = self.root / layout.FOLLOW_FILE
        state = layout.read_json(path, "follower state") if path.is_file() else {}
        return {"leader": self.leader, "workspace_id": state.get("workspace_id"), "floor": state.get("floor", -1)}

    def _write_state(self) -> None:
        layout.atomic_write_json(self.root / layout.FOLLOW_FILE, self.state)

    @property
    def floor(self) -> int:
        return int(self.state.get("floor", -1))

    @property
    def serving(self) -> int | None:
        return self.runtime.pack.version if self.runtime is not None else None

    # HTTP ------------------------------------------------------------------------------------
    def _open(self, url: str, timeout: float, headers: dict | None = None):
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:
                return exc
            raise TransferError(f"{url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise TransferError(f"{url}: {getattr(exc, 'reason', exc)}") from None

    def _get(self, url: str, timeout: float) -> bytes:
        with self._open(url, timeout) as r:
            try:
                return r.read()
            except (OSError, http.client.HTTPException) as exc:
                raise TransferError(f"{url}: {exc}") from None

    def listing(self, after: int = -1, wait: float = 0.0) -> dict:
        q = urllib.parse.urlencode({"after": after, "wait": wait, "member": self.member, "port": self.port or 0,
                                    "serving": -1 if self.serving is None else self.serving})
        try:
            # a poll cut by a dead link ends by this timeout: it bounds how late a restored link is noticed
            return json.loads(self._get(f"{self.base}/packs?{q}", wait + self.connect_timeout))
        except ValueError as exc:
            raise TransferError(f"{self.base}/packs: not JSON ({exc})") from None

    # backbones, fetched once ---------------------------------------------------------------
    def ensure_backbones(self) -> None:
        """Make ``DIR/backbones`` hold exactly the leader's ``backbones.json`` and the files it lists,
        each matching its sha256; files written atomically, the index last (it commits them)."""
        folder = self.root / "backbones"
        raw = self._get(f"{self.base}/backbones", self.connect_timeout)  # small; a restart offline waits no longer
        try:
            index = json.loads(raw)["modalities"]
        except (ValueError, KeyError, TypeError) as exc:
            raise TransferError(f"the leader's backbones.json is not valid ({exc})") from None
        local = folder / INDEX_FILE
        files = {}
        for e in index.values():
            files[e["file"]] = e["sha256"]
            if e.get("tokenizer"):
                files[e["tokenizer"]["file"]] = e["tokenizer"]["sha256"]
        for name, digest in files.items():
            if Path(name).name != name or name.startswith("."):
                raise TransferError(f"the leader's backbones.json names {name!r}, not a plain file name")
            path = folder / name
            if path.is_file() and sha256_file(path) == digest:
                continue
            log.info("fetching backbone file %s", name)
            tmp = folder / f"{layout.TMP_PREFIX}{name}.{os.getpid()}"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                h = hashlib.sha256()
                with self._open(f"{self.base}/backbones/{urllib.parse.quote(name)}", 30) as r, open(tmp, "wb") as f:
                    while block := r.read(BLOCK):
                        h.update(block)
                        f.write(block)
                    f.flush()
                    os.fsync(f.fileno())
                if h.hexdigest() != digest:
                    raise TransferError(f"backbone file {name} does not match the sha256 in the leader's backbones.json")
                os.replace(tmp, path)
                layout.fsync_dir(folder)
            except (OSError, http.client.HTTPException) as exc:
                raise TransferError(f"backbone file {name}: {exc}") from None
            finally:
                tmp.unlink(missing_ok=True)
        if not local.is_file() or local.read_bytes() != raw:
            layout.atomic_write_bytes(local, raw)

    # one pack: download, verify, commit ------------------------------------------------------
    def download(self, version: int) -> Path:
        """The pack's archive in ``DIR/downloads``, whole and matching the sha256 the leader sent."""
        folder = self.root / layout.DOWNLOADS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = layout.pack_name(version)
        parts = sorted(folder.glob(f"{name}.*.partial"))
        headers, part, digest, offset = {}, None, None, 0
        if parts:
            part = parts[-1]
            digest, offset = part.name.split(".")[1], part.stat().st_size
            if offset and sha256_file(part) == digest:
                return part  # arrived whole before an interruption
            headers = {"Range": f"bytes={offset}-", "If-Range": f'"{digest}"'}
        url = f"{self.base}/packs/{name}"
        with self._open(url, 10, headers) as r:
            status = getattr(r, "status", None) or r.code
            if status == 416 or (status == 206 and not (r.headers.get("Content-Range") or "").startswith(f"bytes {offset}-")):
                part.unlink(missing_ok=True)
                raise TransferError(f"{url}: cannot resume at byte {offset}; restarting", "transfer_errors")
            if status != 206:  # the whole archive: any partial one is of other bytes
                for p in parts:
                    p.unlink(missing_ok=True)
                digest = r.headers.get("x-mmcl-archive-sha256") or ""
                if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                    raise TransferError(f"{url}: no archive sha256 announced")
                part, offset = folder / f"{name}.{digest}.partial", 0
            length = int(r.headers.get("Content-Length") or 0)
            if offset + length > archive.MAX_ARCHIVE_BYTES:
                raise TransferError(f"{url}: {offset + length} bytes is beyond the pack archive limit")
            got, cut = 0, None
            try:
                with open(part, "ab" if offset else "wb") as f:
                    while block := r.read(BLOCK):
                        f.write(block)
                        got += len(block)
                    f.flush()
                    os.fsync(f.fileno())
            except (OSError, http.client.HTTPException) as exc:
                cut = exc
            if cut is not None or (length and got < length):  # the connection dropped: what arrived stays for a resume
                raise TransferError(f"{url}: cut after {offset + got} bytes ({cut or 'closed early'}); resuming",
                                    "transfer_errors")
        if sha256_file(part) != digest:
            size = part.stat().st_size
            part.unlink(missing_ok=True)
            raise TransferError(f"{url}: {size} bytes arrived that do not match the announced sha256 "
                                "(corrupted or cut in transit); fetching it again", "transfer_errors")
        return part

    def install(self, version: int) -> None:
        """Download pack ``version``, verify it through the runtime (it serves only if every check
        passes), then move it into ``DIR/packs``, point ``DIR/current`` at it and raise the floor."""
        part = self.download(version)
        name = layout.pack_name(version)
        packs = self.root / layout.PACKS_DIR
        packs.mkdir(parents=True, exist_ok=True)
        tmp = packs / f"{layout.TMP_PREFIX}{name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            try:
                archive.extract_archive(part, tmp)
                declared = json.loads((tmp / MANIFEST_FILE).read_text()).get("version")
            except (OSError, ValueError, AttributeError) as exc:
                raise PackRejected(f"{name} from the leader: no readable manifest ({exc})") from None
            if declared != version:
                raise PackRejected(f"{name} from the leader says it is version {declared!r}")
            if self.runtime is None:
                self.runtime = self._runtime(tmp)
            else:
                self.runtime.swap(tmp)  # the local checks, all of them; the old pack serves on failure
            final = packs / name
            if final.exists():
                shutil.rmtree(final)  # a copy left by an interrupted commit; this one was just verified
            os.replace(tmp, final)
            layout.fsync_dir(packs)
            self.runtime.pack.folder = final
            layout.set_current(self.root, name)
            self.state.update(floor=max(self.floor, version), leader=self.leader,
                              workspace_id=self.runtime.policy.workspace_id)
            self._write_state()
            part.unlink(missing_ok=True)
            self.counts["fetched"] += 1
        except PackRejected:
            part.unlink(missing_ok=True)  # a bad pack is not resumed; it is fetched anew after a pause
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _runtime(self, pack) -> Runtime:
        return Runtime(self.root, providers=self.providers, threads=self.threads, pack=pack,
                       trusted_keys=self.trusted_keys or None, workspace_id=self.state.get("workspace_id"),
                       warmup_seconds=self.warmup_seconds)

    # start and follow ----------------------------------------------------------------------
    def _clean(self) -> None:
        packs = self.root / layout.PACKS_DIR
        if packs.is_dir():
            for p in packs.iterdir():
                if p.name.startswith(layout.TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _local(self) -> Runtime | None:
        """The pack ``DIR/current`` names, else the pack at the floor: verified, never below the floor."""
        if not (self.root / "backbones" / INDEX_FILE).is_file():
            return None
        try:
            current = layout.read_current(self.root)
        except PackRejected as exc:
            log.warning("%s", exc)
            current = None
        names = [current] if current else []
        if self.floor >= 0 and layout.pack_name(self.floor) not in names:
            names.append(layout.pack_name(self.floor))
        for name in names:
            if not (self.root / layout.PACKS_DIR / name).is_dir():
                continue
            try:
                rt = self._runtime(name)
            except (PackRejected, RuntimeUserError) as exc:
                log.warning("the local pack %s cannot serve: %s", name, exc)
                continue
            if rt.pack.version >= self.floor:
                if name != current:
                    layout.set_current(self.root, name)
                return rt
            log.warning("the local pack %s is v%04d, below the floor v%04d: not served", name, rt.pack.version,
                        self.floor)
        return None

    def bootstrap(self, on_wait=None, deadline: float | None = None) -> Runtime:
        """Serve the local pack if it verifies; else fetch the backbones and the leader's pack,
        retrying until one serves (``on_wait(message)`` each failed try; ``deadline``: give up)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean()
        try:  # the leader's backbones when it answers (they may have changed: export --precision), else ours
            self.ensure_backbones()
        except TransferError as exc:
            log.warning("serving from %s without the leader: %s", self.root, exc)
        self.runtime = self._local()
        if self.runtime is not None:
            return self.runtime
        delay = 0.5
        while self.runtime is None:
            try:
                self.ensure_backbones()
                listing = self.listing()
                self._contact(listing)
                if listing["serving"] <= self.floor:
                    raise TransferError(f"the leader serves v{listing['serving']:04d}, not above this "
                                        f"follower's floor v{self.floor:04d}")
                self.install(listing["serving"])
            except (TransferError, PackRejected, RuntimeUserError) as exc:
                self.last_error = str(exc)
                if on_wait:
                    on_wait(str(exc))
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeUserError(f"no pack to serve from {self.leader}: {exc}") from None
                if self._stop.wait(delay):
                    raise RuntimeUserError("stopped before a pack could serve") from None
                delay = min(2 * delay, 2.0)
        return self.runtime

    def _contact(self, listing: dict) -> None:
        self.last_contact = time.time()
        index = self.root / "backbones" / INDEX_FILE
        theirs = listing.get("backbones_sha256")
        self.backbones_changed = bool(theirs and index.is_file() and archive.sha256(index.read_bytes()) != theirs)
        self.leader_version = int(listing["serving"])
        if self.serving is None or self.leader_version > self.serving:
            self.behind_since = self.behind_since or time.time()
        else:
            self.behind_since = None

    def sync_once(self, wait: float = 0.0) -> bool:
        """One look at the leader (a long poll of ``wait`` s); installs its pack when newer. True: installed."""
        after = max(self.serving if self.serving is not None else -1, self.floor)
        now = time.monotonic()
        # a version refused a moment ago is not news: wait for a newer one (or the end of the poll)
        after = max([after] + [v for v, until in self._refused_until.items() if until > now])
        listing = self.listing(after=after, wait=wait)
        self._contact(listing)
        version = self.leader_version
        if version <= max(self.serving or -1, self.floor) or time.monotonic() < self._refused_until.get(version, 0):
            return False
        try:
            self.install(version)
        except PackRejected:
            self.counts["refused"] += 1
            # the same version again after 2, 4, 8 ... 60 s: tampering in transit passes, a bad pack costs little
            tries = self._refusals[version] = self._refusals.get(version, 0) + 1
            self._refused_until[version] = time.monotonic() + min(60.0, 2.0 ** tries)
            raise
        self._contact(listing)
        return True

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="mmcl-follower", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        delay = 0.25
        while not self._stop.is_set():
            try:
                self.sync_once(self.wait)
                self.last_error, delay = None, 0.25
                continue
            except TransferError as exc:
                self.counts[exc.kind] += 1
                self.last_error = str(exc)
            except PackRejected as exc:
                self.last_error = f"refused: {exc}"
            except Exception as exc:  # the follower must outlive anything the network or a pack can do
                log.exception("follower step failed")
                self.last_error = f"failed: {exc!r}"
            log.warning("follower: %s", self.last_error)
            self._stop.wait(delay)
            delay = min(2 * delay, 2.0)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def status(self) -> dict:
        now = time.time()
        serving = self.serving
        behind = None if self.leader_version is None or serving is None else max(0, self.leader_version - serving)
        return {"leader": self.leader, "member": self.member, "leader_version": self.leader_version, "serving": serving,
                "floor": self.floor, "behind_versions": behind,
                "behind_seconds": round(now - self.behind_since, 3) if behind and self.behind_since else 0.0,
                "last_contact_seconds": None if self.last_contact is None else round(now - self.last_contact, 3),
                "last_error": self.last_error, "authenticated": bool(self.trusted_keys),
                "backbones_changed": self.backbones_changed, **self.counts}


class FollowerCollector:
    """The follower's lag and counts in ``/metrics`` (the pack version is the server's own gauge)."""

    def __init__(self, follower: Follower):
        self.follower = follower

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.follower.status()
        yield GaugeMetricFamily("mmcl_follow_leader_version", "Version the leader serves (-1: not reached yet)",
                                value=-1 if s["leader_version"] is None else s["leader_version"])
        yield GaugeMetricFamily("mmcl_follow_behind_versions", "Versions this follower is behind its leader",
                                value=s["behind_versions"] or 0)
        yield GaugeMetricFamily("mmcl_follow_behind_seconds", "Seconds since the leader first served a newer version",
                                value=s["behind_seconds"])
        yield GaugeMetricFamily("mmcl_follow_last_contact_seconds", "Seconds since the leader last answered (-1: never)",
                                value=-1 if s["last_contact_seconds"] is None else s["last_contact_seconds"])
        for key, text in (("fetched", "Packs fetched, verified and serving"), ("refused", "Packs fetched and refused"),
                          ("transfer_errors", "Downloads cut or corrupted in transit (fetched again)"),
                          ("unreachable", "Looks at the leader that got no answer")):
            yield CounterMetricFamily(f"mmcl_follow_{key}", text, value=s[key])
