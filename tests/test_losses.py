"""Each term of the joint objective against a small case computed independently with numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmcl_edge import losses

pytestmark = pytest.mark.usefixtures("single_thread")


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def t(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def test_classification_hand_case():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    target = np.array([0, 2])
    # -log softmax at the target, averaged over the batch
    expected = np.mean([
        -(2.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-1.0))),
        -(0.0 - math.log(math.exp(0.5) + math.exp(1.5) + math.exp(0.0))),
    ])
    got = losses.classification(t(logits), torch.tensor(target))
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_distillation_uses_old_columns_only_with_temperature():
    temperature = 2.0
    old = np.array([[1.0, 3.0], [0.0, -1.0], [2.0, 2.0]])
    new = np.array([[0.5, 2.0, 9.0], [1.0, 0.0, -4.0], [0.0, 3.0, 5.0]])  # column 2 is a new class
    p_old = np_softmax(old / temperature)
    p_new = np_softmax(new[:, :2] / temperature)
    kl_per_sample = (p_old * (np.log(p_old) - np.log(p_new))).sum(axis=1)
    expected = kl_per_sample.mean() * temperature ** 2
    got = losses.distillation(t(new), t(old), temperature)
    assert float(got) == pytest.approx(expected, rel=1e-9)

    # the new class's logit does not matter; matching old logits gives zero
    new2 = new.copy()
    new2[:, 2] = -100.0
    assert float(losses.distillation(t(new2), t(old), temperature)) == pytest.approx(expected, rel=1e-9)
    same = np.concatenate([old, np.zeros((3, 1))], axis=1)
    assert float(losses.distillation(t(same), t(old), temperature)) == pytest.approx(0.0, abs=1e-12)


def test_distillation_temperature_matters():
    old = t([[1.0, 3.0, 0.0]])
    new = t([[3.0, 1.0, 0.0]])
    assert float(losses.distillation(new, old, 1.0)) != pytest.approx(float(losses.distillation(new, old, 4.0)))


def np_relaxed_alignment(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Reference: for each ordered modality pair (a, b), mean over samples of the cross-entropy
    between the same-class distribution and softmax(cos(z_a[i], z_b[:]) / T)."""
    b, m, _ = z.shape
    z = unit(z)
    total, pairs = 0.0, 0
    for a in range(m):
        for c in range(m):
            if a == c:
                continue
            per_sample = []
            for i in range(b):
                logits = np.array([z[i, a] @ z[j, c] for j in range(b)]) / temperature
                log_p = logits - np.log(np.exp(logits).sum())
                pos = [j for j in range(b) if y[j] == y[i]]
                per_sample.append(-np.mean([log_p[j] for j in pos]))
            total += np.mean(per_sample)
            pairs += 1
    return total / pairs


def test_relaxed_alignment_hand_case():
    z = np.array([
        [[1.0, 0.0], [0.8, 0.6], [0.0, 2.0]],
        [[0.0, 1.0], [0.2, 1.0], [1.0, 1.0]],
        [[1.0, 1.0], [1.0, -0.5], [-1.0, 0.3]],
    ])  # [B=3, M=3, W=2]
    y = np.array([0, 1, 0])
    expected = np_relaxed_alignment(z, y, 0.5)
    got = losses.relaxed_alignment(t(z), torch.tensor(y), 0.5)
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_relaxed_alignment_two_samples_closed_form():
    # two modalities, two samples of different classes; a = [e1, e2], b = [e1, e2] after normalising
    z = np.array([[[2.0, 0.0], [1.0, 0.0]], [[0.0, 3.0], [0.0, 0.5]]])
    temperature = 0.5
    # each row of the similarity matrix is [1, 0] or [0, 1]: loss = log(1 + exp(-1/T)) for every term
    expected = math.log(1.0 + math.exp(-1.0 / temperature))
    got = losses.relaxed_alignment(t(z), torch.tensor([0, 1]), temperature)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_relaxed_alignment_single_modality_is_zero():
    z = torch.randn(4, 1, 8)
    assert float(losses.relaxed_alignment(z, torch.tensor([0, 1, 0, 1]), 0.2)) == 0.0


def test_relaxed_alignment_prefers_aligned_class_structure():
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    centres = torch.eye(3, 8) * 5.0
    # both modalities place each class near the same direction (different noise per modality)
    aligned = torch.stack([centres[y] + 0.1 * torch.randn(6, 8, generator=gen) for _ in range(2)], dim=1)
    shuffled = aligned.clone()
    shuffled[:, 1] = aligned[torch.tensor([2, 4, 0, 5, 1, 3]), 1]  # modality 1 no longer matches the labels
    low = float(losses.relaxed_alignment(aligned, y, 0.2))
    high = float(losses.relaxed_alignment(shuffled, y, 0.2))
    assert low < high


def np_relational(new: np.ndarray, old: np.ndarray) -> float:
    def sim(x):
        x = unit(x)
        return x @ x.T

    if new.ndim == 2:
        return float(np.mean((sim(new) - sim(old)) ** 2))
    return float(np.mean([np.mean((sim(new[:, m]) - sim(old[:, m])) ** 2) for m in range(new.shape[1])]))


def test_relational_preservation_identical_is_zero():
    x = torch.randn(5, 7, dtype=torch.float64)
    assert float(losses.relational_preservation(x, x.clone())) == pytest.approx(0.0, abs=1e-14)
    # only the relations matter: a rescaled copy is also "identical"
    assert float(losses.relational_preservation(3.0 * x, x)) == pytest.approx(0.0, abs=1e-14)
    x3 = torch.randn(5, 2, 7, dtype=torch.float64)
    assert float(losses.relational_preservation(x3, x3.clone())) == pytest.approx(0.0, abs=1e-14)


def test_relational_preservation_hand_case_2d():
    # new: orthogonal pair (cos 0); old: 45 degrees apart (cos 1/sqrt2)
    new = np.array([[1.0, 0.0], [0.0, 2.0]])
    old = np.array([[1.0, 0.0], [1.0, 1.0]])
    c = 1.0 / math.sqrt(2.0)
    expected = (0 + c ** 2 + c ** 2 + 0) / 4.0  # the two off-diagonal entries differ by c
    assert float(losses.relational_preservation(t(new), t(old))) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(np_relational(new, old), rel=1e-12)


def test_relational_preservation_per_modality_3d():
    rng = np.random.default_rng(1)
    new, old = rng.normal(size=(3, 2, 4)), rng.normal(size=(3, 2, 4))
    got = float(losses.relational_preservation(t(new), t(old)))
    assert got == pytest.approx(np_relational(new, old), rel=1e-9)


def test_load_balance_hand_case():
    # one depth, B=2, M=1, E=2
    probs = np.array([[[0.7, 0.3]], [[0.6, 0.4]]])
    gates = np.array([[[1.0, 0.0]], [[1.0, 0.0]]])          # top-1: both routed to expert 0
    # frac = [1, 0]; mean prob = [0.65, 0.35]; E * sum = 2 * 0.65
    assert float(losses.load_balance([t(probs)], [t(gates)])) == pytest.approx(1.3, rel=1e-12)

    balanced_probs = np.full((2, 1, 2), 0.5)
    balanced_gates = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    balanced = float(losses.load_balance([t(balanced_probs)], [t(balanced_gates)]))
    assert balanced == pytest.approx(1.0, rel=1e-12)     # the minimum of the Switch loss

    # averaged over depths
    both = float(losses.load_balance([t(probs), t(balanced_probs)], [t(gates), t(balanced_gates)]))
    assert both == pytest.approx((1.3 + 1.0) / 2, rel=1e-12)
