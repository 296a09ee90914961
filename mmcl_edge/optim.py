"""The adapters' optimiser: AdamW under a one-cycle learning-rate schedule, in plain tensor ops.

Why not ``torch.optim.AdamW`` + ``lr_scheduler.OneCycleLR``: constructing a PyTorch optimiser
imports its compiler stack (``torch._dynamo``, ``sympy``; the optimiser's methods are wrapped to be
skipped by ``torch.compile``), +73 MB that stay resident for the learner's life: on an 8 GB device
shared with a robot stack, the largest single item of the learner's peak after the ridge head.
This class computes what those two compute on a CPU (their single-tensor AdamW, the cosine
one-cycle schedule with beta1 cycled inversely), bit for bit: ``tests/test_optim.py`` holds the
parameters after a schedule equal to PyTorch's.
"""
from __future__ import annotations

import math

import torch


class OneCycleAdamW:
    """``step()`` applies one AdamW update at the current learning rate and beta1, then advances
    the schedule (``torch``'s ``opt.step(); sched.step()``). Parameters without a gradient are
    skipped and keep no state, as in PyTorch."""

    def __init__(self, params, max_lr: float, weight_decay: float, total_steps: int, pct_start: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, base_momentum: float = 0.85, max_momentum: float = 0.95):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("no parameters to optimise")
        self.weight_decay, self.eps, self.beta2 = weight_decay, eps, betas[1]
        self.total_steps = int(total_steps)
        initial = max_lr / div_factor
        # (end step, start lr, end lr, start beta1, end beta1): warm up, then anneal
        self.phases = [(float(pct_start * self.total_steps) - 1, initial, max_lr, max_momentum, base_momentum),
                       (self.total_steps - 1, max_lr, initial / final_div_factor, base_momentum, max_momentum)]
        self.state: dict[torch.Tensor, list] = {}
        self.scheduled = 0
        self.lr, self.beta1 = self._schedule(0)

    @staticmethod
    def _cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def _schedule(self, step: int) -> tuple[float, float]:
        if step > self.total_steps:
            raise ValueError(f"stepped {step} times, past the schedule's {self.total_steps} steps")
        start = 0.0
        for i, (end, lr0, lr1, m0, m1) in enumerate(self.phases):
            if step <= end or i == len(self.phases) - 1:
                span = end - start
                pct = (step - start) / span if span else 1.0   # a schedule of one step per phase
                return self._cos(lr0, lr1, pct), self._cos(m0, m1, pct)
            start = end
        raise AssertionError("unreachable")

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        lr, beta1, beta2 = self.lr, self.beta1, self.beta2
        for p in self.params:
            if p.grad is None:
                continue
            if p not in self.state:
                self.state[p] = [torch.tensor(0.0), torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros_like(p, memory_format=torch.preserve_format)]
            count, exp_avg, exp_avg_sq = self.state[p]
            count += 1
            step = count.item()
            grad = p.grad
            p.mul_(1 - lr * self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
        self.scheduled += 1
        self.lr, self.beta1 = self._schedule(self.scheduled)   # past the schedule: an error, as in PyTorch
