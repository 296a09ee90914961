"""``bench fleet``: a leader and followers on separate network hosts of this machine, under faults.

Hosts are Linux network namespaces joined by veth pairs (``ip netns``; needs root): the leader in
one, each follower in its own with its own folder, addresses 10.231.i.1 (leader side) and 10.231.i.2
(follower i), nothing routed off the machine. In each follower's host a client asks the follower
for an answer every few ms and logs the pack version of each answer: that log is the measurement.
Between the leader and the followers sits a proxy in the leader's host: it can corrupt an archive
in transit (the announced sha256 kept: a transfer error), tamper with one (sha256 rewritten to
match: only the pack's own verification can catch it), slow archives down and cut what is in
flight when the leader is killed (as a power loss would).

Publishing is ``republish``: the current pack copied under the next version and re-signed with the
workspace's key, so a publish costs milliseconds and the bench measures the moving, not the learning.

    python -m mmcl_edge.bench.fleet proxy ...     the fault proxy (started by the bench)
    python -m mmcl_edge.bench.fleet client ...    the client (started by the bench)
Torch-free: followers and this harness never import the learner.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mmcl_edge.runtime import layout

NS_PREFIX = "mmclfleet"
PORT, PROXY_PORT = 8000, 8001
FAULTS = ("none", "corrupt", "tamper", "link", "leader-kill", "follower-kill")


class NamespaceError(Exception):
    """Network namespaces cannot be made here (no privileges, no ``ip``): the reason, in one line."""


# publishing -------------------------------------------------------------------------------------
def republish(root: Path) -> int:
    """Publish the current pack again as the next version, signed with the workspace's key
    (``WS/keys/signing.key``); written like any pack (temporary folder, fsync, rename, then current)."""
    from mmcl_edge.runtime.pack import MANIFEST_FILE, pack_digest
    from mmcl_edge.runtime.trust import PRIVATE_KEY_FILE, SIGNATURE_FILE, sign_pack

    root = Path(root)
    key = root / "keys" / PRIVATE_KEY_FILE
    with layout.workspace_lock(root, "bench fleet publish"):
        src = layout.current_folder(root)
        version = layout.next_version(root)
        name = layout.pack_name(version)
        tmp = root / layout.PACKS_DIR / f"{layout.TMP_PREFIX}{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        (tmp / SIGNATURE_FILE).unlink(missing_ok=True)
        manifest = json.loads((tmp / MANIFEST_FILE).read_text())
        manifest["version"] = version
        manifest["sha256"] = pack_digest(manifest)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if key.is_file():
            sign_pack(tmp, manifest, key)
        for f in tmp.iterdir():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        layout.fsync_dir(tmp)
        os.replace(tmp, root / layout.PACKS_DIR / name)
        layout.fsync_dir(root / layout.PACKS_DIR)
        layout.set_current(root, name)
    return version


# hosts ------------------------------------------------------------------------------------------
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NamespaceError(f"ip {' '.join(args)}: {exc}") from None
    if check and r.returncode:
        raise NamespaceError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def remove_stale_namespaces() -> list[str]:
    """Namespaces a killed run of this bench left behind (their pid is gone)."""
    gone = []
    r = _ip("netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(NS_PREFIX):
            continue
        pid = "".join(c for c in name[len(NS_PREFIX):].split("x")[0] if c.isdigit())
        if pid and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


class Hosts:
    """A leader namespace and ``followers`` namespaces, each joined to the leader by a veth pair."""

    def __init__(self, followers: int = 2, subnet: int = 231):
        tag = f"{NS_PREFIX}{os.getpid()}x{int(time.time() * 1000) % 100000}"
        self.leader = f"{tag}l"
        self.followers = [f"{tag}f{i}" for i in range(followers)]
        self.subnet = subnet
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def leader_ip(self, i: int) -> str:
        return f"10.{self.subnet}.{i + 1}.1"

    def follower_ip(self, i: int) -> str:
        return f"10.{self.subnet}.{i + 1}.2"

    def create(self) -> None:
        remove_stale_namespaces()
        try:
            for ns in [self.leader, *self.followers]:
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            for i, ns in enumerate(self.followers):
                _ip("link", "add", f"l{i}", "netns", self.leader, "type", "veth", "peer", "name", "up0", "netns", ns)
                _ip("-n", self.leader, "addr", "add", f"{self.leader_ip(i)}/24", "dev", f"l{i}")
                _ip("-n", ns, "addr", "add", f"{self.follower_ip(i)}/24", "dev", "up0")
                _ip("-n", self.leader, "link", "set", f"l{i}", "up")
                _ip("-n", ns, "link", "set", "up0", "up")
        except NamespaceError:
            self.destroy()
            raise

    def set_link(self, i: int, up: bool) -> None:
        _ip("-n", self.followers[i], "link", "set", "up0", "up" if up else "down")

    def popen(self, ns: str, argv: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as f:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=f, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def destroy(self) -> None:
        for p in self.procs:
            stop(p)
        for ns in self.created:  # what our processes left running in our namespaces (daemons: Ray's)
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ValueError, ProcessLookupError, PermissionError):
                    pass
            _ip("netns", "del", ns, check=False)
        self.created = []


def stop(p: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """End ``p`` (started here): ``sig``, then SIGKILL when it does not go within ``timeout``."""
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(sig)
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
    except ProcessLookupError:
        pass


# the fault proxy --------------------------------------------------------------------------------
def _take(ctl: Path, name: str) -> bool:
    """Consume one count of fault ``name`` from the control folder."""
    path = ctl / name
    try:
        n = int(path.read_text() or 0)
    except (OSError, ValueError):
        return False
    if n <= 0:
        return False
    layout.atomic_write_text(path, str(n - 1))
    return True


async def _proxy(listen: str, port: int, upstream: int, ctl: Path, log: Path) -> None:
    conns: set[asyncio.StreamWriter] = set()
    epoch = {"cut": (ctl / "cut").read_text() if (ctl / "cut").exists() else ""}

    def note(**event):
        with open(log, "a") as f:
            f.write(json.dumps({"t": time.time(), **event}) + "\n")

    async def watch_cut():
        while True:
            await asyncio.sleep(0.05)
            now = (ctl / "cut").read_text() if (ctl / "cut").exists() else ""
            if now != epoch["cut"]:
                epoch["cut"] = now
                for w in list(conns):
                    w.transport.abort()
                note(event="cut", connections=len(conns))

    async def handle(reader, writer):
        conns.add(writer)
        up_w = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode(errors="replace")
            up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream)
            conns.add(up_w)
            up_w.write(head)
            archive = "/packs/v" in line
            if archive and b"range:" in head.lower():
                note(event="range", request=line)
            rhead = await up_r.readuntil(b"\r\n\r\n")
            if archive and rhead.startswith(b"HTTP/1.1 20"):
                lines = rhead.decode("latin-1").split("\r\n")
                length = next(int(v.split(":", 1)[1]) for v in lines if v.lower().startswith("content-length:"))
                body = bytearray(await up_r.readexactly(length))
                tamper, corrupt = _take(ctl, "tamper"), False
                if not tamper:
                    corrupt = _take(ctl, "corrupt")
                if tamper or corrupt:
                    body[len(body) // 2] ^= 0xFF  # inside the pack's graph (the largest member)
                if tamper:
                    import hashlib

                    digest = hashlib.sha256(body).hexdigest()
                    lines = [f"x-mmcl-archive-sha256: {digest}" if v.lower().startswith("x-mmcl-archive-sha256")
                             else f'etag: "{digest}"' if v.lower().startswith("etag") else v for v in lines]
                    rhead = "\r\n".join(lines).encode("latin-1")
                if tamper or corrupt:
                    note(event="tamper" if tamper else "corrupt", request=line)
                writer.write(rhead)
                rate = float((ctl / "throttle").read_text() or 0) if (ctl / "throttle").exists() else 0
                step = 8192
                for i in range(0, len(body), step):
                    writer.write(bytes(body[i:i + step]))
                    await writer.drain()
                    if rate > 0:
                        await asyncio.sleep(step / rate)
            else:
                writer.write(rhead)
                while data := await up_r.read(1 << 16):
                    writer.write(data)
                    await writer.drain()
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, StopIteration, ValueError):
            pass
        finally:
            for w in (writer, up_w):
                if w is not None:
                    conns.discard(w)
                    w.close()

    server = await asyncio.start_server(handle, listen, port)
    asyncio.get_running_loop().create_task(watch_cut())
    async with server:
        await server.serve_forever()


# the client -------------------------------------------------------------------------------------
def _client(url: str, out: Path, interval: float, inputs: Path | None) -> None:
    """Ask ``url`` for answers until SIGTERM; log time, success and pack version of each, one JSON a line."""
    import numpy as np

    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    model = f"{url}/v2/models/mmcl"
    body = None
    with open(out, "a", buffering=1) as f:
        while not stopping:
            t = time.time()
            try:
                if body is None:
                    meta = json.load(urllib.request.urlopen(model, timeout=5))
                    if inputs is not None:
                        with np.load(inputs) as z:
                            arrays = {k[2:]: z[k][:1] for k in z.files if k.startswith("x_")}
                    else:
                        arrays = {i["name"]: np.zeros([1, *[max(d, 1) for d in i["shape"][1:]]], np.float32)
                                  for i in meta["inputs"]}
                    body = json.dumps({"inputs": [{"name": m, "shape": list(a.shape), "datatype": "FP32",
                                                   "data": a.ravel().tolist()} for m, a in arrays.items()],
                                       "outputs": [{"name": "labels"}]}).encode()
                req = urllib.request.Request(f"{model}/infer", data=body, method="POST")
                with urllib.request.urlopen(req, timeout=5) as r:
                    answer = json.load(r)
                f.write(json.dumps({"t": t, "ok": True, "v": answer["parameters"]["pack_version"]}) + "\n")
            except Exception as exc:  # every failure is data here
                f.write(json.dumps({"t": t, "ok": False, "err": str(exc)[:200]}) + "\n")
            time.sleep(interval)
        try:
            final = json.load(urllib.request.urlopen(f"{model}/packs", timeout=5))
        except Exception as exc:
            final = {"error": str(exc)[:200]}
        f.write(json.dumps({"t": time.time(), "final": final}) + "\n")


# the run ----------------------------------------------------------------------------------------
@dataclass
class Fleet:
    """The processes of one run and where they log."""

    hosts: Hosts
    ws: Path
    work: Path
    trusted_key: Path
    follow_wait: float
    leader: subprocess.Popen | None = None
    proxy: subprocess.Popen | None = None
    followers: list = field(default_factory=list)
    clients: list = field(default_factory=list)

    @property
    def ctl(self) -> Path:
        return self.work / "ctl"

    def start_leader(self) -> None:
        self.leader = self.hosts.popen(self.hosts.leader, [sys.executable, "-m", "mmcl_edge.cli.main", "serve", "-w",
                                                           str(self.ws), "--host", "0.0.0.0", "--port", str(PORT),
                                                           "--poll", "0.1", "--threads", "1",
                                                           "--trusted-key", str(self.trusted_key)],
                                       self.work / "leader.log")

    def start_follower(self, i: int) -> subprocess.Popen:
        p = self.hosts.popen(self.hosts.followers[i],
                             [sys.executable, "-m", "mmcl_edge.cli.main", "serve", "-w", str(self.work / f"f{i}"),
                              "--host", "0.0.0.0", "--port", str(PORT), "--threads", "1",
                              "--follow", f"http://{self.hosts.leader_ip(i)}:{PROXY_PORT}",
                              "--trusted-key", str(self.trusted_key), "--follow-wait", str(self.follow_wait)],
                             self.work / f"f{i}.log")
        if i < len(self.followers):
            self.followers[i] = p
        else:
            self.followers.append(p)
        return p

    def start(self, n: int, interval: float, inputs: Path | None) -> None:
        self.ctl.mkdir(parents=True, exist_ok=True)
        self.start_leader()
        self.proxy = self.hosts.popen(self.hosts.leader, [sys.executable, "-m", "mmcl_edge.bench.fleet", "proxy",
                                                          "--port", str(PROXY_PORT), "--upstream", str(PORT),
                                                          "--ctl", str(self.ctl), "--log", str(self.work / "proxy.jsonl")],
                                      self.work / "proxy.log")
        for i in range(n):
            self.start_follower(i)
            self.clients.append(self.hosts.popen(
                self.hosts.followers[i], [sys.executable, "-m", "mmcl_edge.bench.fleet", "client", "--url",
                                          f"http://127.0.0.1:{PORT}", "--out", str(self.work / f"client{i}.jsonl"),
                                          "--interval", str(interval)] + (["--inputs", str(inputs)] if inputs else []),
                self.work / f"client{i}.log"))

    def answers(self, i: int) -> list[dict]:
        path = self.work / f"client{i}.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # the line being written
        return out

    def serving_since(self, i: int, version: int, after: float) -> float | None:
        """Time of the first answer of follower ``i`` from pack ``version`` or later, at or after ``after``."""
        for a in self.answers(i):
            if a.get("ok") and a["t"] >= after and a["v"] >= version:
                return a["t"]
        return None

    def wait_all(self, version: int, after: float, timeout: float) -> list[float | None]:
        end = time.time() + timeout
        while True:
            got = [self.serving_since(i, version, after) for i in range(len(self.followers))]
            if all(g is not None for g in got) or time.time() > end:
                return got
            time.sleep(0.05)

    def leader_ready(self, since_bytes: int, timeout: float = 60.0) -> float:
        log = self.work / "leader.log"
        end = time.time() + timeout
        while time.time() < end:
            if "serving pack" in log.read_text(errors="replace")[since_bytes:]:
                return time.time()
            time.sleep(0.05)
        raise RuntimeError("the leader did not restart: " + log.read_text(errors="replace")[-2000:])

    def stop_all(self) -> None:
        for p in self.clients:
            stop(p)
        for p in self.followers:
            stop(p)
        stop(self.proxy)
        stop(self.leader)


def _partial(folder: Path) -> bool:
    d = folder / layout.DOWNLOADS_DIR
    return d.is_dir() and any(p.stat().st_size > 0 for p in d.glob("*.partial"))


def _swapping(folder: Path) -> bool:
    d = folder / layout.PACKS_DIR
    return d.is_dir() and any(p.name.startswith(layout.TMP_PREFIX) for p in d.iterdir())


def run(ws: Path, work: Path, trusted_key: Path, *, followers: int = 2, faults: list[str] | None = None,
        publishes: int = 5, seed: int = 0, follow_wait: float = 2.0, link_down: float = 3.0,
        interval: float = 0.025, inputs: Path | None = None, converge_timeout: float = 30.0,
        throttle: float = 100e3, say=print) -> dict:
    """One run: hosts up, leader + proxy + followers + clients, one publish per fault, everything
    stopped and the namespaces deleted. Returns per-publish times and the tallies the issue asks for."""
    rng = random.Random(seed)
    faults = list(faults) if faults is not None else [rng.choice(FAULTS) for _ in range(publishes)]
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    hosts = Hosts(followers)
    hosts.create()
    fleet = Fleet(hosts, Path(ws).resolve(), work, Path(trusted_key).resolve(), follow_wait)
    events: list[dict] = []
    restarts: list[tuple[int, float, float]] = []  # follower, killed at, serving again at
    published = [int(layout.read_current(ws)[1:])]
    try:
        fleet.start(followers, interval, inputs)
        t0 = time.time()
        first = fleet.wait_all(published[0], 0, 90)
        if None in first:
            raise RuntimeError("the followers did not start serving: "
                               + " | ".join((work / f"f{i}.log").read_text(errors="replace")[-800:] for i in range(followers)))
        say(f"{followers} followers serving v{published[0]:04d} after {max(first) - t0:.1f} s")
        for k, fault in enumerate(faults):
            j = rng.randrange(followers)
            (fleet.ctl / "throttle").write_text("0")
            if fault in ("corrupt", "tamper"):
                (fleet.ctl / fault).write_text(str(followers))
            elif fault == "link":
                hosts.set_link(j, False)
            elif fault == "leader-kill":
                (fleet.ctl / "throttle").write_text(str(throttle))
            t_pub = time.time()
            version = republish(ws)
            published.append(version)
            fault_end = t_pub
            if fault == "link":
                time.sleep(link_down)
                hosts.set_link(j, True)
                fault_end = time.time()
            elif fault == "leader-kill":
                end = time.time() + 20
                while not any(_partial(work / f"f{i}") for i in range(followers)) and time.time() < end:
                    time.sleep(0.01)
                mid = any(_partial(work / f"f{i}") for i in range(followers))
                stop(fleet.leader, signal.SIGKILL)
                (fleet.ctl / "cut").write_text(str(k))  # the dead host's connections go with it
                (fleet.ctl / "throttle").write_text("0")
                size = (work / "leader.log").stat().st_size
                time.sleep(0.5)
                fleet.start_leader()
                fault_end = fleet.leader_ready(size)
                events.append({"publish": k, "leader_killed_mid_download": mid})
            elif fault == "follower-kill":
                end = time.time() + 5
                while not _swapping(work / f"f{j}") and time.time() < end:
                    time.sleep(0.002)
                mid = _swapping(work / f"f{j}")
                killed = time.time()
                stop(fleet.followers[j], signal.SIGKILL)
                leftovers = sorted(p.name for p in (work / f"f{j}" / layout.PACKS_DIR).iterdir()
                                   if not layout.PACK_NAME.match(p.name))
                fleet.start_follower(j)
                back = fleet.wait_all(0, time.time(), 60)[j]
                restarts.append((j, killed, back or time.time()))
                fault_end = back or time.time()
                events.append({"publish": k, "follower": j, "killed_mid_swap": mid, "left_in_packs": leftovers})
            got = fleet.wait_all(version, t_pub, converge_timeout)
            row = {"publish": k, "version": version, "fault": fault,
                   "follower": j if fault in ("link", "follower-kill") else None,
                   "publish_to_serve_s": [None if g is None else round(g - t_pub, 3) for g in got],
                   "after_fault_s": [None if g is None else round(max(0.0, g - fault_end), 3) for g in got]}
            events.append(row)
            say(f"publish {k}: v{version:04d} fault {fault:13s} serving on followers after "
                + ", ".join("never" if g is None else f"{g - t_pub:.2f} s" for g in got))
            if None in got:
                break
    finally:
        fleet.stop_all()
        hosts.destroy()
    return _tally(fleet, followers, published, events, restarts)


def _tally(fleet: Fleet, followers: int, published: list[int], events: list[dict], restarts) -> dict:
    rows = [e for e in events if "publish_to_serve_s" in e]
    per = []
    for i in range(followers):
        answers = fleet.answers(i)
        final = next((a["final"] for a in reversed(answers) if "final" in a), {})
        ok = [a for a in answers if a.get("ok")]
        start = ok[0]["t"] if ok else float("inf")
        down = [(k, b) for f, k, b in restarts if f == i]
        failed = [a for a in answers if a.get("ok") is False and a["t"] > start
                  and not any(k - 1 <= a["t"] <= b for k, b in down)]
        during_restart = [a for a in answers if a.get("ok") is False and any(k - 1 <= a["t"] <= b for k, b in down)]
        versions = [a["v"] for a in ok]
        per.append({"follower": i, "answers": len(ok), "failed": len(failed), "failed_examples": [a["err"] for a in failed[:3]],
                    "failed_while_killed": len(during_restart),
                    "went_back": sum(1 for a, b in zip(versions, versions[1:]) if b < a),
                    "not_published": sorted(set(versions) - set(published)),
                    "final_version": versions[-1] if versions else None, "status": final.get("follows")})
    proxy = []
    path = fleet.work / "proxy.jsonl"
    if path.is_file():
        proxy = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lat = sorted(x for r in rows if r["fault"] == "none" for x in r["publish_to_serve_s"] if x is not None)
    after = [x for r in rows if r["fault"] != "none" for x in r["after_fault_s"] if x is not None]
    return {"published": published, "rows": rows, "events": [e for e in events if "publish_to_serve_s" not in e],
            "followers": per,
            "proxy": {k: sum(1 for e in proxy if e["event"] == k) for k in ("corrupt", "tamper", "range", "cut")},
            "summary": {"publishes": len(rows), "converged": sum(1 for r in rows if None not in r["publish_to_serve_s"]),
                        "publish_to_serve_s_max_no_fault": max(lat) if lat else None,
                        "publish_to_serve_s_median_no_fault": lat[len(lat) // 2] if lat else None,
                        "after_fault_s_max": max(after) if after else None,
                        "failed_requests": sum(p["failed"] for p in per),
                        "unpublished_versions_served": sum(len(p["not_published"]) for p in per),
                        "versions_went_back": sum(p["went_back"] for p in per)}}


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmcl_edge.bench.fleet")
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("proxy")
    p.add_argument("--listen", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", type=int, required=True)
    p.add_argument("--ctl", type=Path, required=True)
    p.add_argument("--log", type=Path, required=True)
    c = sub.add_parser("client")
    c.add_argument("--url", required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--interval", type=float, default=0.025)
    c.add_argument("--inputs", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.what == "proxy":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        asyncio.run(_proxy(a.listen, a.port, a.upstream, a.ctl, a.log))
    else:
        _client(a.url, a.out, a.interval, a.inputs)


if __name__ == "__main__":
    main()
