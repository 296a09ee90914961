"""``Runtime.predict`` timed as a user's own program would time it (issue #19's "independent" view):
a fresh Python process that imports numpy first, then the runtime; no ``mmcl-edge`` entry point,
so nothing of the CLI's environment. Once with the runtime's thread policy (the default) and once
with ``MMCL_EDGE_THREAD_POLICY=off`` (library defaults: numpy's OpenBLAS on every core).

    python benchmarks/public_api_latency.py WS [--repeats 300] [--out public-api-latency.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, sys, time
import numpy as np
from mmcl_edge.runtime import Runtime
from mmcl_edge.runtime.latency import percentiles, workspace_test_samples
rt = Runtime(sys.argv[1])
samples, why = workspace_test_samples(rt.root)
if samples is None:
    sys.exit(f"the workspace's test data cannot be loaded here: {why}")
one = {m: s[0] for m, s in samples.items()}
for _ in range(30):
    rt.predict(one)
ms = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    rt.predict(one)
    ms.append(1e3 * (time.perf_counter() - t0))
print(json.dumps({"predict_ms": percentiles(ms), "blas_limited": rt.blas_limited, "lanes": rt.backbones.lanes}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--out", default="public-api-latency.json")
    args = ap.parse_args()
    # the user's own environment, minus what the CLI would have set for them
    base = {k: v for k, v in os.environ.items() if k not in (
        "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "MMCL_EDGE_THREAD_ENV_SET", "MMCL_EDGE_THREAD_POLICY")}
    result = {"workspace": os.path.abspath(args.workspace), "repeats": args.repeats, "runs": {}}
    for name, extra in (("policy on (default)", {}), ("policy off", {"MMCL_EDGE_THREAD_POLICY": "off"})):
        proc = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(args.workspace), str(args.repeats)],
                              env={**base, **extra}, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            print(f"error: {name}: {proc.stderr.strip()[-500:]}", file=sys.stderr)
            return 1
        result["runs"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{'run':<22} {'p50 ms':>8} {'p99 ms':>8}  BLAS limited")
    for name, r in result["runs"].items():
        p = r["predict_ms"]
        print(f"{name:<22} {p['p50']:>8.2f} {p['p99']:>8.2f}  {r['blas_limited']}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
