"""The adapters' optimiser (mmcl_edge/optim.py) is PyTorch's AdamW + OneCycleLR, bit for bit,
without loading PyTorch's compiler stack."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from mmcl_edge.optim import OneCycleAdamW


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 3),
                               torch.nn.LayerNorm(3))


@pytest.mark.parametrize("total,steps", [(120, 120), (90, 70), (3, 3)], ids=["whole", "fewer-steps", "tiny"])
def test_the_same_parameters_as_adamw_with_one_cycle(total, steps):
    ours, theirs = _model(), _model()
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    frozen = ours[2].bias, theirs[2].bias   # a parameter that gets no gradient keeps no state
    opt = OneCycleAdamW([p for p in ours.parameters()], max_lr=2e-3, weight_decay=1e-4, total_steps=total)
    ref = torch.optim.AdamW(theirs.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=2e-3, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if i % 3 == 0:
                (frozen[0] if model is ours else frozen[1]).grad = None
        opt.step()
        ref.step()
        sched.step()
        assert opt.lr == ref.param_groups[0]["lr"] or i == steps - 1 and steps == total
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0].weight, _model()[0].weight)   # it did move


def test_stepping_past_the_schedule_is_an_error():
    p = torch.nn.Parameter(torch.ones(2))
    opt = OneCycleAdamW([p], max_lr=1e-2, weight_decay=0.0, total_steps=2)
    for _ in range(2):
        p.grad = torch.ones(2)
        opt.step()
    with pytest.raises(ValueError, match="past the schedule"):
        p.grad = torch.ones(2)
        opt.step()


def test_it_loads_no_compiler_stack():
    code = ("import sys, torch; from mmcl_edge.optim import OneCycleAdamW\n"
            "p = torch.nn.Parameter(torch.ones(3)); o = OneCycleAdamW([p], 1e-2, 1e-4, 10)\n"
            "p.grad = torch.ones(3); o.step(); o.zero_grad()\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'sympy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
