""""I don't know this": how unlike every learned class a sample is.

The novelty of an answer is ``1 - p_max``, one minus the softmax probability of the class the
streaming ridge head chose. It needs nothing beyond the pack (no extra weights, no extra graph
output: the runtime computes it from the probabilities it already has). Compared on AV-Digits
and UTD-MHAD with a Mahalanobis distance to class means built from the head's own sums (see
benchmarks/README.md), it separated unseen from seen classes as well or better at no cost.

The threshold flags about ``false_alarm`` (5%) of familiar samples. Where the workspace keeps
held-out data (each task's ``test.npz`` or ``--holdout`` share, the data the forgetting gate uses),
it is the ``1 - false_alarm`` quantile of the novelty of every held-out sample under the model just
learned: data recorded apart from the training samples, as what the device meets later is. A
threshold from the training samples themselves, even each left out of the head (the ridge head's
exact leave-one-out prediction, or a whole recorded person at a time), is far too low: the adapters
learned on those very samples, and on UTD-MHAD it flagged 87% of familiar samples of new people.
So training data is only the fallback, for a workspace that has no held-out data yet: then the
leave-one-out quantile (a whole domain at a time when the samples carry domain ids), averaged over
tasks by sample count.
"""
from __future__ import annotations

import torch

DEFAULT_FALSE_ALARM = 0.05


def novelty_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B] 1 - max softmax probability (the runtime computes the same from its probabilities)."""
    return 1.0 - torch.softmax(logits, dim=-1).max(dim=-1).values


@torch.no_grad()
def leave_one_out_novelty(head, feats: torch.Tensor, y: torch.Tensor, n_classes: int,
                          groups=None) -> torch.Tensor:
    """Each training sample's novelty under the ridge head fitted without it (exact for ridge).

    With ``groups`` (the task's domain ids, e.g. the people recorded) and at least two of them, a
    whole group is left out at a time: a familiar class seen on a person the head never saw is
    what the device meets after deployment, and one left-out trial of a person whose other trials
    stayed in is far more familiar than that. ``(I - H_gg)^-1 (F_g w - H_gg Y_g)`` per group, with
    ``H = F (G + lam I)^-1 F^T`` (Woodbury).
    """
    f = feats.double()
    solved = head.solve(f.T)                                   # (G + lam I)^-1 f^T, [D, N]
    if solved is None:
        return novelty_from_logits(head(feats)[:, :n_classes])
    fitted = f @ head.weight.double()[:, :n_classes]
    onehot = torch.nn.functional.one_hot(y, n_classes).double()
    loo = torch.empty_like(fitted)
    ids = None if groups is None else torch.as_tensor(groups)
    if ids is not None and len(torch.unique(ids)) >= 2:
        for gid in torch.unique(ids):
            idx = torch.nonzero(ids == gid).flatten()
            h = f[idx] @ solved[:, idx]                          # [n_g, n_g]
            eye = torch.eye(len(idx), dtype=h.dtype)
            loo[idx] = torch.linalg.solve(eye - h + 1e-9 * eye, fitted[idx] - h @ onehot[idx])
    else:
        h = (f * solved.T).sum(-1).clamp(max=1 - 1e-6)         # leverage of each sample
        loo = (fitted - h[:, None] * onehot) / (1 - h)[:, None]
    return novelty_from_logits((loo * head.logit_scale).float())


class NoveltyThreshold:
    """The running threshold: a sample-weighted mean over tasks of each task's training quantile."""

    def __init__(self, threshold: float = 0.0, samples: int = 0, source: str = "training (leave-one-out)"):
        self.threshold, self.samples, self.source = float(threshold), int(samples), source

    def add(self, scores: torch.Tensor, false_alarm: float) -> float:
        if not len(scores):
            return self.threshold
        q = float(torch.quantile(scores.double(), 1.0 - false_alarm))
        total = self.samples + len(scores)
        self.threshold = (self.threshold * self.samples + q * len(scores)) / total
        self.samples = total
        return self.threshold

    def set_from_heldout(self, scores: torch.Tensor, false_alarm: float) -> float:
        """The threshold from the held-out data the workspace keeps, scored by the current model."""
        self.threshold = float(torch.quantile(scores.double(), 1.0 - false_alarm))
        self.samples, self.source = int(len(scores)), "held-out"
        return self.threshold

    def to_dict(self) -> dict:
        return {"method": "max-softmax", "threshold": self.threshold, "calibration_samples": self.samples,
                "calibrated_on": self.source}
