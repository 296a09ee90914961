"""The terms of the joint objective, each a small pure function with its own weight in LossConfig.

classification + distillation (LwF) + relaxed cross-modal alignment + relational knowledge
preservation (+ router load balancing). A weight of zero switches a term off, so ablations are
configuration, not code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def classification(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """LwF: KL(old || new) on the old model's outputs, softened by ``temperature``, scaled by T^2."""
    n_old = old_logits.shape[-1]
    log_p_new = F.log_softmax(new_logits[..., :n_old] / temperature, dim=-1)
    p_old = F.softmax(old_logits / temperature, dim=-1)
    return F.kl_div(log_p_new, p_old, reduction="batchmean") * temperature ** 2


def relaxed_alignment(per_modality: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-modal supervised contrast on cosine similarities.

    For every ordered pair of modalities (a, b), each sample's embedding in ``a`` should be more
    similar to the ``b``-embeddings of its own class than to those of other classes. Only the
    ordering of similarities is asked for, not identical vectors, so each modality keeps what
    only it knows ("relaxed"). ``per_modality`` is ``[B, M, W]``.
    """
    m = per_modality.shape[1]
    if m < 2:
        return per_modality.new_zeros(())
    z = F.normalize(per_modality, dim=-1)
    same = (target[:, None] == target[None, :]).float()
    positives = same / same.sum(dim=1, keepdim=True)
    total, pairs = per_modality.new_zeros(()), 0
    for a in range(m):
        for b in range(m):
            if a != b:
                log_p = F.log_softmax(z[:, a] @ z[:, b].T / temperature, dim=1)
                total = total - (positives * log_p).sum(dim=1).mean()
                pairs += 1
    return total / pairs


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=-1)
    return x @ x.transpose(-1, -2)


def relational_preservation(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the batch cosine-similarity matrices (new vs previous model).

    ``new``/``old`` are ``[B, W]`` or ``[B, M, W]`` (then per modality, averaged).
    """
    if new.dim() == 3:
        new, old = new.transpose(0, 1), old.transpose(0, 1)
    return F.mse_loss(similarity_matrix(new), similarity_matrix(old))


def load_balance(probs: list[torch.Tensor], gates: list[torch.Tensor]) -> torch.Tensor:
    """Switch-Transformer style: E * sum_e (fraction routed to e) * (mean router prob of e)."""
    total = probs[0].new_zeros(())
    for p, g in zip(probs, gates):
        counts = (g > 0).float().flatten(0, 1).sum(0)
        frac = counts / counts.sum().clamp_min(1.0)
        total = total + p.shape[-1] * (frac * p.flatten(0, 1).mean(0)).sum()
    return total / len(probs)
