"""Time tap extraction of the clothing-cil train split (3,687 reviews + titles + shopper) into a fresh cache."""
import os, sys, time, json
import numpy as np
from pathlib import Path

from mmcl_edge.data import load_scenario
from mmcl_edge.stream import TapSource, label_map
import torch
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.set_num_threads(threads)
sc = load_scenario("clothing-cil", data_dir=os.environ.get("MMCL_EDGE_CLOTHING", "../shared/data/clothing-reviews"), seed=0)
src = TapSource(sc, Path(sys.argv[1]))
lmap = label_map(sc, len(sc.tasks) - 1)
out = {"threads": threads, "load_before": os.getloadavg()}
for m, spec in src.specs.items():
    t0 = time.perf_counter()
    arrays, stats = src.cache.get(m, sc.train.samples[m], spec, src.backbones[m])
    out[m] = {"seconds": round(time.perf_counter() - t0, 1), "extracted": stats.extracted}
    print(m, out[m], flush=True)
out["total_train_seconds"] = round(sum(out[m]["seconds"] for m in src.specs), 1)
out["load_after"] = os.getloadavg()
t0 = time.perf_counter()
src.taps("test", np.arange(len(sc.test.y)), lmap)
out["test_seconds"] = round(time.perf_counter() - t0, 1)
print(json.dumps(out))
