"""Novelty score candidates on a learned workspace (the model after K tasks): seen vs unseen classes.

    python benchmarks/novelty_candidates.py WS K train test

How mmcl-edge chose its novelty score (see benchmarks/README.md, "Teaching the device")."""
import sys, numpy as np, torch
from sklearn.metrics import roc_auc_score
from mmcl_edge.workspace import Workspace
from mmcl_edge.data.dataset import scenario_task
from mmcl_edge.stream import task_taps
from mmcl_edge.learners.adapter import to_torch, presence

ws = Workspace.open(sys.argv[1]); K = int(sys.argv[2])  # model after task K-1
sc = ws.scenario(); src = ws.tap_source()
model = ws.load_model(K - 1); model.eval()
names = ws.class_names(K - 1)
def feats(data):
    out = []
    with torch.no_grad():
        for b in range(0, len(data), 256):
            idx = np.arange(b, min(b + 256, len(data)))
            t = to_torch(data, idx)
            out.append(model.features(t, model.encoder(t, presence(data, idx))))
    return torch.cat(out).double().numpy()
allnames = ws.class_names()
def split_feats(split):
    seen, unseen = [], []
    for k in range(len(sc.tasks)):
        task = scenario_task(sc, k)
        tr, ho, _, _ = task_taps(src, task, allnames)
        d = tr if split == "train" else ho
        (seen if k < K else unseen).append((feats(d), d.y))
    cat = lambda l: (np.concatenate([f for f, _ in l]), np.concatenate([y for _, y in l]))
    return cat(seen), cat(unseen)
head = model.analytic
G = head.gram.numpy(); C = head.class_sums.numpy()[:, :len(names)]
bias = model.fixed_feature_dim() - 1
n = C[bias]; mu = (C / n).T                                # [C, D]
N = G[bias, bias]
Sw = (G - (C / n) @ C.T) / N                               # within-class scatter
D = G.shape[0]
print("D", D, "classes", len(names), "N", N)
evals, evecs = np.linalg.eigh(Sw)
def scores(F, r=None, shrink=None):
    out = {}
    diff = F[:, None, :] - mu[None]                         # [B, C, D]
    out["euclid"] = (diff ** 2).sum(-1).min(1)
    Fn = F / np.linalg.norm(F, axis=1, keepdims=True); mun = mu / np.linalg.norm(mu, axis=1, keepdims=True)
    out["cos"] = 1 - (Fn @ mun.T).max(1)
    logits = F @ head.weight.numpy()[:, :len(names)] * 10
    out["maxlogit"] = -logits.max(1)
    p = np.exp(logits - logits.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    out["msp"] = -p.max(1)
    for r in (16, 64, 256):
        U = evecs[:, -r:]; lam = evals[-r:]
        res = evals[:-r].mean()
        proj = diff @ U                                     # [B, C, r]
        m = (proj ** 2 / (lam + res)).sum(-1) + ((diff ** 2).sum(-1) - (proj ** 2).sum(-1)) / res
        out[f"maha{r}"] = m.min(1)
    # the scorer as exported (mmcl_edge.novelty): sums from the model itself
    if model.novelty is not None:
        out["scorer"] = model.novelty(torch.from_numpy(F).float()).double().numpy()
    return out
for split in sys.argv[3:]:
    (Fs, ys), (Fu, yu) = split_feats(split)
    ss, su = scores(Fs), scores(Fu)
    print(split, "seen", len(Fs), "unseen", len(Fu))
    for k in ss:
        auc = roc_auc_score(np.r_[np.zeros(len(ss[k])), np.ones(len(su[k]))], np.r_[ss[k], su[k]])
        t = np.quantile(ss[k], 0.95)
        print(f"  {k:14s} AUROC {auc:.3f}  unseen flagged at 5% seen FA: {np.mean(su[k] > t):.2f}")
