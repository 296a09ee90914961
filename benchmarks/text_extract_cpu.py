"""CPU seconds (not wall: the machine is shared) to extract MiniLM taps of N clothing reviews + titles, one thread."""
import os, resource, sys, time, tempfile, json
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from mmcl_edge.data import load_scenario
from mmcl_edge.taps import TapCache, backbone_for
n = int(sys.argv[1])
sc = load_scenario("clothing-cil", data_dir=os.environ.get("MMCL_EDGE_CLOTHING", "../shared/data/clothing-reviews"))
rng = np.random.default_rng(0)
idx = rng.choice(len(sc.train.y), n, replace=False)
out = {"n": n}
for m in ("review", "title"):
    spec = sc.specs[m]
    bb = backbone_for(spec, sc.train.samples[m][0])
    cache = TapCache(Path(tempfile.mkdtemp()))
    c0 = resource.getrusage(resource.RUSAGE_SELF); w0 = time.perf_counter()
    cache.get(m, [sc.train.samples[m][i] for i in idx], spec, bb)
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    out[m] = {"cpu_s": round(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime, 1), "wall_s": round(time.perf_counter() - w0, 1)}
out["cpu_s_per_sample"] = (out["review"]["cpu_s"] + out["title"]["cpu_s"]) / n
out["projected_cpu_s_3687"] = round(out["cpu_s_per_sample"] * 3687, 1)
print(json.dumps(out))
