"""Does building a pack's onnxruntime session hold the GIL? (issue #19, swaps under load)

A ticker thread wakes every 0.2 ms and records its longest wait for the GIL while the main thread
(a) sleeps, (b) runs the pack's graph check (pure Python), (c) builds the pack's session as a swap
does. A long wait during (c) means request threads stall on the GIL while a swap builds a session,
so a lower-priority builder thread would only make them wait longer.

    python benchmarks/session_gil.py WS [--builds 15]
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from mmcl_edge.runtime import layout
from mmcl_edge.runtime import providers as prov
from mmcl_edge.runtime.graph_check import check_graph_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--builds", type=int, default=15)
    args = ap.parse_args()
    data = (layout.current_folder(layout.resolve_root(args.workspace)) / "pack.onnx").read_bytes()
    longest, stop = [0.0], threading.Event()

    def ticker():
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            longest[0] = max(longest[0], now - last)
            last = now
            time.sleep(0.0002)

    threading.Thread(target=ticker, daemon=True).start()
    time.sleep(0.1)
    print(f"load average {os.getloadavg()}")
    for name, fn in (("sleep 8 ms", lambda: time.sleep(0.008)), ("graph check", lambda: check_graph_bytes(data)),
                     ("pack session", lambda: prov.session(data, ["CPUExecutionProvider"], 1, optimization="basic"))):
        waits, took = [], []
        for _ in range(args.builds):
            time.sleep(0.01)
            longest[0] = 0.0
            t0 = time.perf_counter()
            fn()
            took.append(1e3 * (time.perf_counter() - t0))
            time.sleep(0.002)  # the ticker records a wait only once it runs again
            waits.append(1e3 * longest[0])
        waits.sort()
        took.sort()
        n = len(waits)
        print(f"{name:13s} takes {took[n // 2]:6.2f} ms (p50); the ticker's longest GIL wait: p50 {waits[n // 2]:5.2f} ms, "
              f"max {waits[-1]:5.2f} ms")
    stop.set()


if __name__ == "__main__":
    main()
