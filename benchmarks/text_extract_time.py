"""Time tap extraction of the clothing-cil train split (3,687 reviews + titles + shopper) into a fresh cache.

Usage: python benchmarks/text_extract_time.py CACHE_DIR [THREADS] > result.json
Runs the learner's own path (``TapSource.taps``): empty titles are absent and cost nothing.
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmcl_edge.data import load_scenario
from mmcl_edge.stream import TapSource, label_map

threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.set_num_threads(threads)
sc = load_scenario("clothing-cil", data_dir=os.environ.get("MMCL_EDGE_CLOTHING", "../shared/data/clothing-reviews"), seed=0)
src = TapSource(sc, Path(sys.argv[1]))
lmap = {c: i for i, c in enumerate(sorted(set(int(c) for c in sc.train.y)))}
out = {"threads": threads, "load_before": os.getloadavg(), "train_samples": len(sc.train.y),
       "present": {m: int(sc.train.presence(m).sum()) for m in src.specs}}
t0, c0 = time.perf_counter(), time.process_time()
_, _, extracted = src.taps("train", np.arange(len(sc.train.y)), lmap)
out["train_seconds"] = round(time.perf_counter() - t0, 1)
out["train_cpu_seconds"] = round(time.process_time() - c0, 1)
out["extracted"] = extracted
out["load_after"] = os.getloadavg()
print(json.dumps(out), flush=True)
