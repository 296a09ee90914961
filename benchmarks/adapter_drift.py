"""Why the paper's components do not move the result: how far the adapters move per task, and how
much of the ridge head's output comes from the adapted embedding vs the frozen taps.

python benchmarks/adapter_drift.py clothing-cil ../shared/data/clothing-reviews CACHE OUT.json train.epochs=5 [train.later_lr_scale=1.0] [--validation]
"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from mmcl_edge.config import LearnConfig
from mmcl_edge.data import load_scenario
from mmcl_edge.data.dataset import validation_scenario
from mmcl_edge.learners import create_learner
from mmcl_edge.stream import TapSource, learn_one_task, task_taps, add_classes, scenario_classes
from mmcl_edge.data.dataset import scenario_task
from mmcl_edge.metrics import summarise

args = [a for a in sys.argv[1:] if a != "--validation"]
name, data_dir, cache, out = args[:4]
over = {}
for kv in args[4:]:
    k, v = kv.split("=", 1)
    over[k] = json.loads(v) if v[0] in "0123456789-tf[{" else v
sc = load_scenario(name, data_dir=data_dir, seed=0)
if "--validation" in sys.argv:
    sc = validation_scenario(sc, seed=0)
src = TapSource(sc, Path(cache))
cfg = LearnConfig().override(over)
learner = create_learner("mmcl", cfg, src.modality_taps, sc.setting, sc.num_classes)
enc = learner.model.encoder
def snap():
    return torch.cat([p.detach().flatten().clone() for p in enc.parameters()])
prev = snap()
rows, matrix, heldouts = [], [], []
classes = scenario_classes(sc)
for t in range(len(sc.tasks)):
    task = scenario_task(sc, t)
    classes = add_classes(classes, task)
    train, heldout, _, _ = task_taps(src, task, classes)
    heldouts.append(heldout)
    row, rec = learn_one_task(learner, t, train, len(classes), heldouts)
    now = snap()
    rel = float((now - prev).norm() / prev.norm())
    prev = now
    # the head's output split: frozen-tap features vs the adapted (fused) embedding, on all held-out data so far
    test = heldouts[0]
    import numpy as _np
    from mmcl_edge.learners.base import TaskData
    f = torch.cat([learner._features(h) for h in heldouts])
    y = _np.concatenate([h.y for h in heldouts])
    n_fixed = learner.model.fixed_feature_dim()
    W = learner.model.analytic.weight.detach()
    fixed = (f[:, :n_fixed] @ W[:n_fixed]).norm().item()
    fused = (f[:, n_fixed:] @ W[n_fixed:]).norm().item()
    acc_fixed_only = float(((f[:, :n_fixed] @ W[:n_fixed]).argmax(1).numpy() == y).mean())
    share = {"fixed_norm": fixed, "fused_norm": fused, "fused_share": fused / (fixed + fused),
             "acc_without_fused": acc_fixed_only, "acc": float(((f @ W).argmax(1).numpy() == y).mean())}
    rows.append({"task": t, "rel_param_change": rel, "head": share, "row": row})
    matrix.append(row)
    print(json.dumps(rows[-1]), flush=True)
from mmcl_edge.stream import square
matrix = square(matrix)
res = {"scenario": sc.name, "overrides": over, "tasks": rows, **summarise(matrix)}
Path(out).write_text(json.dumps(res, indent=2))
print("final", res["final_average_accuracy"])
