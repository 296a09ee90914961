"""What a hostile request costs `mmcl-edge serve` (issue #16): run against a workspace, on loopback only.

    python benchmarks/serve_limits.py -w WS [--out serve-limits.json]

Starts `mmcl-edge serve` (default limits) on a free 127.0.0.1 port and measures:
  - the quiet latency of a small infer request (median of 30);
  - a 200 MB body (declared Content-Length, then streamed): time to its 413, and the small
    request's latency while it is being sent;
  - the same 200 MB as a chunked body (no Content-Length): 413 after the 64 MB counted;
  - a 60 MB JSON body under the cap (parsed, then refused: 15 M values for a [1, 1] shape), and
    the small request's latency meanwhile (decoding runs in a thread, but holds the GIL);
  - a gzip bomb (~1 MB inflating to 1 GB), sent first so that the peak is its own: its status, and
    the server's resident memory before, after and at peak (VmHWM), against the 64 MiB cap.
Every load is bounded (one big request at a time; small ones one after another, at most 1000 per phase).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import zlib

import numpy as np

MB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                fields[k] = int(v.split()[0]) / 1024
    return fields


def small_request(url: str, body: bytes) -> float:
    start = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        assert r.status == 200
    return 1e3 * (time.perf_counter() - start)


SENDER = r"""
import socket, sys, threading, time
port, path, total, chunked, name = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
sock = socket.create_connection(("127.0.0.1", port), timeout=60)
head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n"
done = threading.Event()
prefix = b'{"inputs":[{"name":"' + name.encode() + b'","shape":[1,1],"datatype":"FP32","data":['
suffix = b'0]}]}'
def send():  # a valid JSON request whose data does not fit its shape, of exactly `total` bytes
    block = b"0," * 2**19
    try:
        sock.sendall(head.encode())
        parts = [prefix] + [block] * ((total - len(prefix) - len(suffix)) // len(block))
        parts.append(b" " * (total - len(suffix) - sum(map(len, parts))) + suffix)
        for part in parts:
            if done.is_set():
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass
start = time.perf_counter()
threading.Thread(target=send, daemon=True).start()
answer = bytearray()
try:
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        if not data:
            break
        answer += data
except ConnectionResetError:
    pass
print(int(answer.split()[1]) if answer else -1, time.perf_counter() - start)
done.set()
"""


def big_body(port: int, path: str, total: int, chunked: bool, name: str) -> tuple[int, float]:
    """Send ``total`` bytes of body from another process (its sending must not slow this one's
    measurements); (status, seconds until the answer)."""
    out = subprocess.run([sys.executable, "-c", SENDER, str(port), path, str(total), "1" if chunked else "0", name],
                         capture_output=True, text=True, timeout=120).stdout.split()
    return int(out[0]), float(out[1])


def latency_during(url: str, body: bytes, busy: threading.Event, n: int = 1000) -> list[float]:
    out = []
    while busy.is_set() and len(out) < n:
        out.append(small_request(url, body))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", required=True)
    ap.add_argument("--out", default="serve-limits.json")
    args = ap.parse_args()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmcl_edge.cli.main", "serve", "-w", args.workspace,
                             "--port", str(port), "--provider", "cpu"], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    infer = "/v2/models/mmcl/infer"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/v2/health/ready", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        meta = json.loads(urllib.request.urlopen(base + "/v2/models/mmcl").read())
        rng = np.random.default_rng(0)
        inputs = []
        for i in meta["inputs"]:
            shape = [1] + [d if d > 0 else 16 for d in i["shape"][1:]]
            inputs.append({"name": i["name"], "shape": shape, "datatype": "FP32",
                           "data": rng.normal(size=shape).astype(np.float32).ravel().tolist()})
        small = json.dumps({"inputs": inputs}).encode()
        for _ in range(5):
            small_request(base + infer, small)
        quiet = [small_request(base + infer, small) for _ in range(30)]
        result = {"quiet_ms": {"median": statistics.median(quiet), "max": max(quiet)}}
        before = rss_mb(proc.pid)
        comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        zeros = bytes(MB)
        bomb = b"".join(comp.compress(zeros) for _ in range(1024)) + comp.flush()
        req = urllib.request.Request(base + infer, data=bomb, headers={"Content-Encoding": "gzip"})
        start = time.perf_counter()
        try:
            status = urllib.request.urlopen(req, timeout=60).status
        except urllib.error.HTTPError as e:
            status = e.code
        after = rss_mb(proc.pid)
        result["gzip_bomb_1GB"] = {"compressed_bytes": len(bomb), "status": status,
                                   "seconds": time.perf_counter() - start,
                                   "rss_mb_before": before["VmRSS"], "rss_mb_after": after["VmRSS"],
                                   "peak_rss_mb_before": before["VmHWM"], "peak_rss_mb_after": after["VmHWM"],
                                   "cap_mb": 64}
        cases = (("declared_200MB", 200 * MB, False), ("chunked_200MB", 200 * MB, True),
                 ("json_60MB_under_the_cap", 60 * MB, False))
        for name, size, chunked in cases:
            busy = threading.Event()
            busy.set()
            lat: list[float] = []
            t = threading.Thread(target=lambda: lat.extend(latency_during(base + infer, small, busy)))
            t.start()
            status, seconds = big_body(port, infer, size, chunked, meta["inputs"][0]["name"])
            busy.clear()
            t.join()
            result[name] = {"status": status, "seconds_to_answer": seconds,
                            "small_during_ms": {"median": statistics.median(lat) if lat else None,
                                                "p90": float(np.percentile(lat, 90)) if lat else None,
                                                "max": max(lat) if lat else None, "n": len(lat)}}
        result["peak_rss_mb_end"] = rss_mb(proc.pid)["VmHWM"]
        result["small_after_ms"] = small_request(base + infer, small)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
