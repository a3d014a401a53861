"""Gradients and the optimizer as plain tensor code, so a whole learner step compiles
into one graph.

`loss.backward()`, `optimizer.zero_grad()` and `torch.optim.Adam.step()` each end a
torch.compile graph: the Double-DQN step compiled to 9 graphs, and Python ran between
them every update. With gradients from `torch.func` and this Adam, sample, targets,
loss, gradients, clipping and the parameter update trace into a single graph
(one graph to record on CUDA; `fastrl bench learn` measures the updates/s).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

Params = dict[str, torch.Tensor]


def gradients(loss_fn: Callable[[Params], tuple[torch.Tensor, Any]], params: Params
              ) -> tuple[Params, torch.Tensor, Any]:
    """d loss / d params for `loss_fn(params) -> (loss, aux)`, without touching `.grad`.
    Returns (grads, loss, aux), loss detached."""
    if torch.compiler.is_compiling():  # torch.func traces into the graph; autograd.grad would end it
        grads, (loss, aux) = torch.func.grad_and_value(loss_fn, has_aux=True)(params)
        return grads, loss.detach(), aux
    # Eager: the same gradients from plain autograd, without torch.func's per-op wrapping.
    loss, aux = loss_fn(params)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())))), loss.detach(), aux


class Adam:
    """Adam with gradient-norm clipping: the maths of torch.optim.Adam (default flags)
    and nn.utils.clip_grad_norm_ (tested against both), as in-place tensor ops.

    `params` are the module's own parameters, updated in place. The learning rate
    `lr` and the step count are 0-d device tensors: schedules change `lr` in place, so
    a compiled step never sees a new Python constant (no recompiles, no host sync).
    """

    def __init__(self, module: nn.Module, lr: float, max_grad_norm: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params: Params = dict(module.named_parameters())
        self.device = device = next(iter(self.params.values())).device
        self.lr = torch.tensor(lr, dtype=torch.float32, device=device)
        self.max_grad_norm = max_grad_norm
        self.beta1, self.beta2 = betas
        self._betas = torch.tensor(betas, dtype=torch.float64, device=device)
        self.eps = eps
        # float64: in float32, 1 - 0.999 ** step loses 4 digits in the first steps.
        self.steps = torch.zeros((), dtype=torch.float64, device=device)
        # beta1 ** steps and beta2 ** steps, kept by one multiplication a step: a power
        # computed inside the step would be inlined by inductor into every element's loop.
        self.beta_powers = torch.ones(2, dtype=torch.float64, device=device)
        self.exp_avg = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in self.params.items()}

    @torch.no_grad()
    def step(self, grads: Params) -> torch.Tensor:
        """Clips `grads` to max_grad_norm (if > 0) and updates the parameters; returns
        the gradient norm before clipping (0-d)."""
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        scale = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0) if self.max_grad_norm > 0 else None
        b1, b2 = self.beta1, self.beta2
        self.steps += 1
        self.beta_powers.mul_(self._betas)
        step_size = (self.lr / (1 - self.beta_powers[0])).float()
        bias_correction2_sqrt = (1 - self.beta_powers[1]).sqrt().float()
        for name, param in self.params.items():
            grad = grads[name] if scale is None else grads[name] * scale
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            exp_avg.lerp_(grad, 1 - b1)
            exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            # param -= step_size * exp_avg / denom, with one temporary (the denominator)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps).div_(step_size)
            param.addcdiv_(exp_avg, denom, value=-1.0)
        return norm

    def state_dict(self) -> dict:
        """The moments, the step count, the betas' powers and the learning rate (CPU tensors)."""
        return {"steps": self.steps.cpu(), "beta_powers": self.beta_powers.cpu(), "lr": self.lr.cpu(),
                "exp_avg": {k: v.cpu() for k, v in self.exp_avg.items()},
                "exp_avg_sq": {k: v.cpu() for k, v in self.exp_avg_sq.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict() saved, in place (compiled steps keep their tensors)."""
        self.steps.copy_(state["steps"])
        # A state saved before the powers were kept has the step count alone.
        self.beta_powers.copy_(state["beta_powers"] if "beta_powers" in state else self._betas ** self.steps)
        self.lr.copy_(state["lr"])
        for name in self.params:
            self.exp_avg[name].copy_(state["exp_avg"][name])
            self.exp_avg_sq[name].copy_(state["exp_avg_sq"][name])
