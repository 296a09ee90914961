"""Classifier heads: GrowingHead, FixedHead and the closed-form StreamingRidgeHead."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcl_edge.analytic import StreamingRidgeHead, fit_drift_map
from mmcl_edge.heads import FixedHead, GrowingHead

pytestmark = pytest.mark.usefixtures("single_thread")


def test_growing_head_grows_and_keeps_old_outputs():
    torch.manual_seed(0)
    head = GrowingHead(6, [2])
    z = torch.randn(4, 6)
    before = head(z).detach().clone()
    old_state = {k: v.clone() for k, v in head.state_dict().items()}

    head.grow(3)
    assert head.block_sizes() == [2, 3]
    assert head.num_outputs == 5
    out = head(z)
    assert out.shape == (4, 5)
    torch.testing.assert_close(out[:, :2], before, rtol=0, atol=0)
    for k, v in old_state.items():
        assert torch.equal(head.state_dict()[k], v)

    head.grow(0)                       # nothing new: no empty block
    assert head.block_sizes() == [2, 3]
    head.grow(1)
    assert head.block_sizes() == [2, 3, 1] and head(z).shape == (4, 6)


def test_growing_head_output_is_concatenation_of_blocks():
    torch.manual_seed(1)
    head = GrowingHead(3, [2, 1])
    z = torch.randn(5, 3)
    w = torch.cat([b.weight for b in head.blocks]).detach().numpy()
    bias = torch.cat([b.bias for b in head.blocks]).detach().numpy()
    np.testing.assert_allclose(head(z).detach().numpy(), z.numpy() @ w.T + bias, rtol=1e-5, atol=1e-6)


def test_fixed_head_never_grows():
    head = FixedHead(4, 5)
    assert head.block_sizes() == [5]
    head.grow(3)
    assert head.block_sizes() == [5] and head.num_outputs == 5
    assert head(torch.randn(2, 4)).shape == (2, 5)


def _data(n: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randint(0, k, (n,), generator=gen)


def test_ridge_head_update_is_order_invariant():
    f, y = _data(40, 5, 3, seed=0)
    one = StreamingRidgeHead(5, 3)
    one.update(f, y)
    two = StreamingRidgeHead(5, 3)
    two.update(f[25:], y[25:])        # a later chunk first
    two.update(f[:25], y[:25])
    torch.testing.assert_close(one.gram, two.gram)
    torch.testing.assert_close(one.class_sums, two.class_sums)
    one.solve()
    two.solve()
    torch.testing.assert_close(one.weight, two.weight)
    assert StreamingRidgeHead(5, 3).empty and not one.empty


def test_ridge_head_solve_matches_numpy_ridge():
    ridge = 0.1
    f, y = _data(30, 4, 3, seed=1)
    head = StreamingRidgeHead(4, 3, ridge=ridge)
    head.update(f, y)
    head.solve()

    x = f.numpy().astype(np.float64)
    targets = np.eye(3)[y.numpy()]
    lam = ridge * np.sum(x * x) / x.shape[1]          # ridge relative to the mean feature energy
    w = np.linalg.solve(x.T @ x + lam * np.eye(4), x.T @ targets)
    np.testing.assert_allclose(head.weight.numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head(f).numpy(), (x @ w) * head.logit_scale, rtol=1e-4, atol=1e-5)


def test_ridge_head_fits_separable_classes():
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(60) % 3
    f = torch.eye(3, 6)[y] * 4.0 + 0.1 * torch.randn(60, 6, generator=gen)
    head = StreamingRidgeHead(6, 3)
    head.update(f, y)
    head.solve()
    assert (head(f).argmax(dim=1) == y).all()


def test_ridge_head_transform_identity_keeps_weights():
    f, y = _data(20, 4, 2, seed=3)
    head = StreamingRidgeHead(4, 2)
    head.update(f, y)
    head.solve()
    w = head.weight.clone()
    gram, sums = head.gram.clone(), head.class_sums.clone()
    head.transform(torch.eye(4))
    head.solve()
    assert torch.equal(head.gram, gram) and torch.equal(head.class_sums, sums)
    torch.testing.assert_close(head.weight, w)


def test_ridge_head_transform_equals_updating_with_moved_features():
    f, y = _data(20, 4, 2, seed=4)
    m = torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    moved = StreamingRidgeHead(4, 2)
    moved.update(f, y)
    moved.transform(m)
    direct = StreamingRidgeHead(4, 2)
    direct.update(f.double() @ m.double(), y)
    torch.testing.assert_close(moved.gram, direct.gram)
    torch.testing.assert_close(moved.class_sums, direct.class_sums)


def test_ridge_head_transform_fast_path_equals_the_full_product():
    """With the first columns of the map the identity (frozen features), only the moving block is
    recomputed; the sums must be those of the full m^T G m."""
    f, y = _data(30, 7, 3, seed=6)
    m = torch.eye(7, dtype=torch.float64)
    m[:, 4:] = torch.randn(7, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    full, fast = StreamingRidgeHead(7, 3), StreamingRidgeHead(7, 3)
    for h in (full, fast):
        h.update(f, y)
    full.transform(m)
    fast.transform(m, keep=4)
    torch.testing.assert_close(fast.gram, full.gram)
    torch.testing.assert_close(fast.class_sums, full.class_sums)
    torch.testing.assert_close(fast.gram, fast.gram.T)


def test_fit_drift_map_recovers_linear_drift():
    rng = np.random.default_rng(0)
    n, n_fixed, n_adapted = 200, 4, 3
    fixed = np.concatenate([rng.normal(size=(n, n_fixed - 1)), np.ones((n, 1))], axis=1)  # last fixed: bias
    adapted_old = rng.normal(size=(n, n_adapted))
    a_true = rng.normal(size=(n_adapted, n_adapted))
    b_true = rng.normal(size=n_adapted)
    adapted_new = adapted_old @ a_true + b_true
    old = np.concatenate([fixed, adapted_old], axis=1)
    new = np.concatenate([fixed, adapted_new], axis=1)

    m = fit_drift_map(torch.tensor(old), torch.tensor(new), n_fixed, ridge=1e-10).numpy()
    assert m.shape == (n_fixed + n_adapted,) * 2
    np.testing.assert_array_equal(m[:, :n_fixed], np.eye(n_fixed + n_adapted)[:, :n_fixed])  # fixed part untouched
    np.testing.assert_allclose(m[n_fixed:, n_fixed:], a_true, atol=1e-6)
    np.testing.assert_allclose(m[n_fixed - 1, n_fixed:], b_true, atol=1e-6)
    np.testing.assert_allclose(m[: n_fixed - 1, n_fixed:], 0.0, atol=0)
    np.testing.assert_allclose(old @ m, new, atol=1e-6)

    # the learner asks for the moving columns only (no dense [dim, dim] identity): the same head after
    cols = fit_drift_map(torch.tensor(old), torch.tensor(new), n_fixed, ridge=1e-10, moving_only=True)
    np.testing.assert_array_equal(cols.numpy(), m[:, n_fixed:])
    f, y = torch.tensor(old, dtype=torch.float32), torch.tensor(np.arange(n) % 3)
    full, lean = StreamingRidgeHead(n_fixed + n_adapted, 3), StreamingRidgeHead(n_fixed + n_adapted, 3)
    for h, mm in ((full, torch.tensor(m)), (lean, cols)):
        h.update(f, y)
        h.transform(mm, keep=n_fixed)
        h.solve()
    assert torch.equal(full.gram, lean.gram) and torch.equal(full.weight, lean.weight)


def test_drift_map_from_the_bias_and_adapted_columns_alone_is_the_same():
    """The learner keeps only the bias and the adapted columns of its features for the drift map
    (not [views x samples, dim] copies): fitted on those with ``n_fixed=1`` and placed from the bias
    row on, it is the moving-only map of the whole features, bit for bit."""
    rng = np.random.default_rng(1)
    n, n_fixed, n_adapted = 300, 6, 4
    fixed = np.concatenate([rng.normal(size=(n, n_fixed - 1)), np.ones((n, 1))], axis=1)
    old = torch.tensor(np.concatenate([fixed, rng.normal(size=(n, n_adapted))], axis=1), dtype=torch.float32)
    new = torch.tensor(np.concatenate([fixed, rng.normal(size=(n, n_adapted))], axis=1), dtype=torch.float32)
    whole = fit_drift_map(old, new, n_fixed, moving_only=True)
    narrow = fit_drift_map(old[:, n_fixed - 1:], new[:, n_fixed - 1:], 1, moving_only=True)
    placed = torch.zeros_like(whole)
    placed[n_fixed - 1:] = narrow
    assert torch.equal(placed, whole)


def test_teacher_is_a_frozen_copy_without_the_ridge_sums():
    """The distillation teacher gives the model's training logits but holds no Gram matrix (84 MB
    on AV-Digits); the model keeps its own."""
    from mmcl_edge.backbones import TapSpec
    from mmcl_edge.config import EncoderConfig
    from mmcl_edge.model import MMCLModel

    taps = {"a": (TapSpec("t0", 4, 16),), "b": (TapSpec("t0", 2, 8),)}
    model = MMCLModel(taps, EncoderConfig(tap_rank=4), "class-il", n_classes=3, head_blocks=[3], head_mode="analytic").eval()
    gen = torch.Generator().manual_seed(0)
    x = {"a": [torch.randn(5, 4, 16, generator=gen)], "b": [torch.randn(5, 2, 8, generator=gen)]}
    model.analytic.update(model.features(x, model.encoder(x)), torch.tensor([0, 1, 2, 0, 1]))
    gram = model.analytic.gram.clone()
    old = model.teacher()
    assert old.analytic.gram.numel() == 0 and old.analytic.class_sums.numel() == 0
    assert torch.equal(model.analytic.gram, gram)
    assert not any(p.requires_grad for p in old.parameters()) and not old.training
    assert torch.equal(old.training_logits(x)[0], model.training_logits(x)[0])


def _spd(d: int, seed: int) -> torch.Tensor:
    x = torch.randn(d, d + 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x @ x.T


@pytest.mark.parametrize("source", ["torch", "scipy"])
def test_in_place_cholesky_solve_matches_torch_and_restores_the_matrix(source, monkeypatch):
    """The ridge head's solve factors its Gram matrix in its own memory (no [d, d] copies): same
    answer as torch's Cholesky, and the matrix is as before afterwards."""
    from mmcl_edge import cholesky

    if source == "scipy":  # a PyTorch build that exports no LAPACK
        monkeypatch.setattr(cholesky, "_FUNCS", [])
        monkeypatch.setattr(cholesky.os.path, "dirname", lambda p: "/nonexistent")
    else:
        monkeypatch.setattr(cholesky, "_FUNCS", [])
    d = 300  # more than one 256-row block
    a = _spd(d, 0)
    b = torch.randn(d, 7, dtype=torch.float64)
    b2 = torch.randn(40, d, dtype=torch.float64).T   # a transposed view, as the head passes features
    lam = 0.5
    chol = torch.linalg.cholesky(a + lam * torch.eye(d, dtype=torch.float64))
    want, want2 = torch.cholesky_solve(b, chol), torch.cholesky_solve(b2, chol)
    work, b_before, b2_before = a.clone(), b.clone(), b2.clone()
    got, got2 = cholesky.cholesky_solve_in_place(work, lam, [b, b2])
    assert torch.equal(work, a) and torch.equal(b, b_before) and torch.equal(b2, b2_before)
    assert (got - want).abs().max() < 1e-10 and (got2 - want2).abs().max() < 1e-10
    not_pd = -a
    assert cholesky.cholesky_solve_in_place(not_pd, 0.0, [b]) is None and torch.equal(not_pd, -a)


def test_ridge_head_solve_is_unchanged_and_leaves_the_sums():
    """``solve`` equals the copying Cholesky it replaced (within float64 rounding; bit for bit where
    PyTorch's own LAPACK is used), returns the solve of ``extra``, and keeps the (rounded) sums."""
    from mmcl_edge.analytic import plus_diagonal

    f, y = _data(400, 300, 5, seed=4)
    head = StreamingRidgeHead(300, 5)
    head.update(f, y)
    gram = head.gram.float().double()
    sums = head.class_sums.float().double()
    lam = head.ridge * torch.trace(gram) / 300
    chol = torch.linalg.cholesky(plus_diagonal(gram, lam))
    extra = f[:50].double().T
    got = head.solve(extra)
    assert torch.equal(head.gram, gram) and torch.equal(head.class_sums, sums)
    assert (head.weight - torch.cholesky_solve(sums, chol).float()).abs().max() < 1e-6
    assert (got - torch.cholesky_solve(extra, chol)).abs().max() < 1e-10
