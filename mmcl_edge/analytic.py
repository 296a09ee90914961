"""A closed-form streaming ridge head (RanPAC/ACIL-style): an improvement over the paper's head.

A linear head trained by gradient on task data alone is biased towards the newest classes when no
old samples are kept. This head keeps running sums instead — the Gram matrix ``G = sum f f^T`` and
class sums ``C = sum f y^T`` of features — and solves ``W = (G + lam I)^-1 C`` after each task.
Over fixed features the sums are order-invariant: after the last task the head equals a ridge head
trained jointly on all tasks, with no sample stored.

The adapted part of the features moves when the adapters learn a new task. ``transform`` carries
the old sums into the new feature space through a linear drift map fitted on the new task's data
(old features -> new features), so old classes' statistics follow the adapters without replay.
"""
from __future__ import annotations

import torch
from torch import nn

from mmcl_edge.cholesky import cholesky_solve_in_place


def pooled_tap_features(taps: dict[str, list[torch.Tensor]], modalities: list[str]) -> torch.Tensor:
    """Frozen-backbone features: every tap of every modality mean-pooled over tokens, L2-normalised,
    concatenated. Shared by the method's analytic head and the SimpleCIL/ridge baselines."""
    return torch.cat([nn.functional.normalize(t.mean(dim=1), dim=-1) for m in modalities for t in taps[m]], dim=-1)


class StreamingRidgeHead(nn.Module):
    def __init__(self, dim: int, n_classes: int, ridge: float = 1e-2):
        super().__init__()
        self.ridge = ridge
        self.register_buffer("gram", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("class_sums", torch.zeros(dim, n_classes, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(dim, n_classes))

    @property
    def empty(self) -> bool:
        """No sample added yet. (``any`` reduces in place; ``abs().sum()`` made a [dim, dim] float64
        copy of the sums, 100 MB at UTD-MHAD's 3,600 features: the learner's peak.)"""
        return not bool(self.gram.any())

    @property
    def num_classes(self) -> int:
        return int(self.class_sums.shape[1])

    @torch.no_grad()
    def grow(self, n_classes: int) -> None:
        """Zero sums for classes not seen yet (nothing about them is known)."""
        extra = n_classes - self.num_classes
        if extra > 0:
            self.class_sums = torch.cat([self.class_sums, self.class_sums.new_zeros(self.class_sums.shape[0], extra)], 1)
            self.weight = torch.cat([self.weight, self.weight.new_zeros(self.weight.shape[0], extra)], 1)

    @torch.no_grad()
    def update(self, feats: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> None:
        f = feats.double()
        for i in range(0, f.shape[1], 256):  # in row blocks of G: a [256, dim] temporary, not [dim, dim]
            self.gram[i:i + 256] += (f[:, i:i + 256].T @ f).mul_(weight)
        self.class_sums.index_add_(1, y, weight * f.T)

    @torch.no_grad()
    def transform(self, m: torch.Tensor, keep: int = 0) -> None:
        """Move the sums to features ``f' = f @ m`` (``m``: [dim, dim]).

        ``keep``: the first ``keep`` columns of ``m`` are the identity (features that never move,
        as the frozen taps under a drift map). Then only the moving block is recomputed: O(d^2 a)
        instead of O(d^3) for ``a`` moving features, which on a 3,600-wide head is 30x less work.
        """
        m = m.double()
        if not keep:
            self.gram.copy_(m.T @ self.gram @ m)
            self.class_sums.copy_(m.T @ self.class_sums)
            return
        # where each moving feature comes from (``m`` may be just these columns: ``fit_drift_map(moving_only=True)``)
        cols = m if m.shape[1] == m.shape[0] - keep else m[:, keep:]
        g_cols = self.gram @ cols                       # [d, a]
        self.gram[:, keep:] = g_cols
        self.gram[keep:, :keep] = g_cols[:keep].T
        self.gram[keep:, keep:] = cols.T @ g_cols
        self.class_sums[keep:] = cols.T @ self.class_sums

    @torch.no_grad()
    def solve(self, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """``W = (G + lam I)^-1 C``; with ``extra`` ([dim, k]) also returns ``(G + lam I)^-1 extra``
        from the same factorisation (None when ``G + lam I`` is not positive definite).

        The factor is computed in ``gram``'s own memory, which is restored after
        (``mmcl_edge.cholesky``): ``G + lam I`` and its factor were two more float64 copies of
        ``gram`` (168 MB at 3,233 features), the learner's peak.
        """
        # The sums are stored as float32 (half the size); rounding them here too makes a run that
        # continues from a saved state bit-identical to one that never stopped.
        for rows in torch.split(self.gram, 256):  # in row blocks: no [dim, dim] float32 temporary
            rows.copy_(rows.float())
        self.class_sums.copy_(self.class_sums.float())
        d = self.gram.shape[0]
        lam = float(self.ridge * torch.trace(self.gram) / d)
        # G + lam I is symmetric positive definite: Cholesky costs half of a general solve
        solved = cholesky_solve_in_place(self.gram, lam, [self.class_sums] + ([] if extra is None else [extra]))
        if solved is None:  # not positive definite after rounding (lam == 0 on rank-deficient sums)
            self.weight.copy_(torch.linalg.solve(plus_diagonal(self.gram, lam), self.class_sums).float())
            return None
        self.weight.copy_(solved[0].float())
        return solved[1] if extra is not None else None

    # Ridge outputs regress one-hot targets (about 0..1); scaling them makes a softmax over them
    # a usable confidence score without changing which class wins.
    logit_scale = 10.0

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats @ self.weight) * self.logit_scale


def plus_diagonal(g: torch.Tensor, lam) -> torch.Tensor:
    """``g + lam * I`` without a dense identity (a 3,233-wide float64 one is 84 MB); the same numbers."""
    out = g.clone()
    out.diagonal().add_(lam)
    return out


def fit_drift_map(old: torch.Tensor, new: torch.Tensor, n_fixed: int, ridge: float = 1e-3,
                  moving_only: bool = False) -> torch.Tensor:
    """The [dim, dim] map that keeps the first ``n_fixed`` features (frozen-backbone part and bias)
    and regresses the remaining (adapted) features' new values on their old values plus a bias.
    ``moving_only``: only its last ``dim - n_fixed`` columns (the rest is the identity), for
    ``StreamingRidgeHead.transform(..., keep=n_fixed)``: no dense [dim, dim] matrix is built."""
    d = old.shape[1]
    bias_col = n_fixed - 1                                   # the constant-1 feature is the last fixed one
    # only the moving columns (and the bias) in float64: the fixed ones are most of the width
    src = torch.cat([old[:, n_fixed:], old[:, bias_col:bias_col + 1]], dim=1).double()   # [N, A + 1]
    lam = ridge * torch.trace(src.T @ src) / src.shape[1]
    a = torch.linalg.solve(src.T @ src + lam * torch.eye(src.shape[1], dtype=src.dtype),
                           src.T @ new[:, n_fixed:].double())
    if moving_only:
        cols = torch.zeros(d, d - n_fixed, dtype=torch.float64)
        cols[n_fixed:] = a[:-1]
        cols[bias_col] = a[-1]
        return cols
    m = torch.eye(d, dtype=torch.float64)
    m[n_fixed:, n_fixed:] = a[:-1]
    m[bias_col, n_fixed:] = a[-1]
    return m
