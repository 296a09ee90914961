"""MMEncoder: shapes, top-k routing, cross-modal routing switch, expert freezing."""
from __future__ import annotations

import pytest
import torch

from mmcl_edge.backbones import TapSpec
from mmcl_edge.config import EncoderConfig
from mmcl_edge.encoder import MMEncoder
from mmcl_edge.experts import ExpertPool

TAPS = {"a": (TapSpec("t0", 4, 8), TapSpec("t1", 4, 16)), "b": (TapSpec("v", 1, 5),)}
B = 6
pytestmark = pytest.mark.usefixtures("single_thread")


def make_encoder(seed: int = 0, **overrides) -> MMEncoder:
    opts = dict(width=16, experts=4, top_k=2, bottleneck=8, depths=3, cross_modal_routing=True, dropout=0.0)
    opts.update(overrides)
    torch.manual_seed(seed)
    return MMEncoder(TAPS, EncoderConfig(**opts))


def random_taps(seed: int, batch: int = B) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {m: [torch.randn(batch, t.tokens, t.dim, generator=gen) for t in specs] for m, specs in TAPS.items()}


def test_output_shapes():
    cfg = dict(width=16, experts=4, depths=3)
    enc = make_encoder(**cfg).eval()
    out = enc(random_taps(1))
    m = len(TAPS)
    assert out.per_modality.shape == (B, m, cfg["width"])
    assert out.fused.shape == (B, cfg["width"])
    assert len(out.gates) == cfg["depths"] and len(out.probs) == cfg["depths"]
    for g, p in zip(out.gates, out.probs):
        assert g.shape == (B, m, cfg["experts"])
        assert p.shape == (B, m, cfg["experts"])
    torch.testing.assert_close(out.fused, out.per_modality.mean(dim=1))
    assert enc.input_names() == ["a__t0", "a__t1", "b__v"]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_exactly_top_k_gates_sum_to_one(top_k):
    enc = make_encoder(top_k=top_k).eval()
    out = enc(random_taps(2))
    for g, p in zip(out.gates, out.probs):
        assert ((g > 0).sum(dim=-1) == top_k).all()
        assert (g >= 0).all()
        torch.testing.assert_close(g.sum(dim=-1), torch.ones(B, len(TAPS)))
        # the chosen experts are the router's top-k
        chosen = g > 0
        lowest_chosen = torch.where(chosen, p, torch.full_like(p, 2.0)).min(dim=-1).values
        highest_other = torch.where(chosen, torch.full_like(p, -1.0), p).max(dim=-1).values
        assert (lowest_chosen >= highest_other).all()
        torch.testing.assert_close(p.sum(dim=-1), torch.ones(B, len(TAPS)))


def _gates_of_a(enc: MMEncoder, taps) -> list[torch.Tensor]:
    with torch.no_grad():
        out = enc(taps)
    return [g[:, 0] for g in out.gates], [p[:, 0] for p in out.probs], out.per_modality[:, 0]


def _a_before_and_after_changing_b(cross_modal_routing: bool):
    """Modality a's gates, probabilities and embedding, before and after only modality b changes."""
    enc = make_encoder(cross_modal_routing=cross_modal_routing).eval()
    taps = random_taps(3)
    changed = {"a": taps["a"], "b": [t * 3.0 + 1.0 + torch.randn_like(t) for t in taps["b"]]}
    return _gates_of_a(enc, taps), _gates_of_a(enc, changed)


def test_without_cross_modal_routing_other_modality_does_not_steer_gates():
    (g1, p1, z1), (g2, p2, z2) = _a_before_and_after_changing_b(False)
    for x, y in zip(g1 + p1, g2 + p2):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-6)


def test_with_cross_modal_routing_other_modality_steers_gates():
    (g1, p1, _), (g2, p2, _) = _a_before_and_after_changing_b(True)
    assert (p1[0] - p2[0]).abs().max() > 1e-5          # already at the first depth
    assert max((x - y).abs().max() for x, y in zip(g1, g2)) > 1e-5


def _train_steps(enc: MMEncoder, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    head = torch.nn.Linear(enc.cfg.width, 3)
    torch.nn.init.normal_(head.weight, std=1.0)
    head.requires_grad_(False)
    for s in range(steps):
        taps = random_taps(100 + seed * 10 + s)
        y = torch.arange(B) % 3
        out = enc(taps)
        loss = torch.nn.functional.cross_entropy(head(out.fused), y) + out.per_modality.pow(3).mean()
        opt.zero_grad(set_to_none=False)   # the harsher case: stale zero grads stay allocated
        loss.backward()
        opt.step()


def _expert_params(enc: MMEncoder, depth: int, expert: int) -> list[torch.Tensor]:
    return [p.detach().clone() for p in enc.pools[depth].experts[expert].parameters()]


def test_frozen_expert_gets_no_gradient_and_keeps_its_values():
    # top_k == experts: every expert is routed, so each would get a gradient unless frozen
    enc = make_encoder(experts=4, top_k=4).train()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2, weight_decay=1e-2)
    _train_steps(enc, opt, 3, seed=0)      # all experts plastic; the optimiser has momentum for all

    frozen_depth, frozen_expert = 1, 2
    enc.pools[frozen_depth].freeze(frozen_expert)
    assert enc.frozen_experts() == [[], [frozen_expert], []]
    before = {(l, e): _expert_params(enc, l, e) for l in range(enc.cfg.depths) for e in range(enc.cfg.experts)}

    _train_steps(enc, opt, 4, seed=1)

    for p, old in zip(enc.pools[frozen_depth].experts[frozen_expert].parameters(), before[(frozen_depth, frozen_expert)]):
        assert not p.requires_grad
        assert p.grad is None or bool((p.grad == 0).all())
        assert torch.equal(p.detach(), old)
    for (l, e), old in before.items():
        if (l, e) == (frozen_depth, frozen_expert):
            continue
        now = list(enc.pools[l].experts[e].parameters())
        assert all(p.requires_grad for p in now)
        assert any(not torch.equal(p.detach(), o) for p, o in zip(now, old)), f"expert {e} at depth {l} did not learn"


def test_frozen_expert_is_still_used():
    enc = make_encoder(experts=3, top_k=3).eval()
    pool = enc.pools[0]
    with torch.no_grad():
        pool.experts[1].up.weight.normal_()
    pool.freeze(1)
    taps = random_taps(5)
    with torch.no_grad():
        base = enc(taps).fused
        pool.experts[1].up.weight.mul_(2.0)
        moved = enc(taps).fused
    assert (base - moved).abs().max() > 1e-4


def test_apply_freezing_restores_requires_grad_after_loading_state():
    src = make_encoder(seed=0)
    src.pools[0].freeze(0)
    src.pools[2].freeze(3)
    dst = make_encoder(seed=1)
    dst.load_state_dict(src.state_dict())
    assert dst.frozen_experts() == [[0], [], [3]]
    dst.apply_freezing()
    for l, pool in enumerate(dst.pools):
        for e, expert in enumerate(pool.experts):
            want = (l, e) not in {(0, 0), (2, 3)}
            assert all(p.requires_grad == want for p in expert.parameters())


def test_expert_pool_output_and_new_expert_is_noop():
    pool = ExpertPool(3, 8, 4)
    x = torch.randn(5, 2, 8)
    y = pool(x)
    assert y.shape == (5, 2, 3, 8)
    assert torch.equal(y, torch.zeros_like(y))   # "up" starts at zero
