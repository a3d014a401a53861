"""The learners' gradients and Adam against torch's own (backward, torch.optim.Adam,
clip_grad_norm_), and the whole DDQN step tracing into one graph, whose kernels C++ calls
on the CPU."""
import copy

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code
from torch.func import functional_call

from fastrl.algos import ddqn
from fastrl.buffer import ReplayRing
from fastrl.nets import QNetwork
from fastrl.optim import Adam, gradients


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])  # autograd eagerly, torch.func when compiled
def test_gradients_match_backward(compiled):
    net, x = _net(), torch.randn(32, 5)

    def grads_of_loss():
        return gradients(lambda p: ((functional_call(net, p, (x,)) ** 2).mean(), x.sum()),
                         dict(net.named_parameters()))

    grads, loss, aux = (torch.compile(grads_of_loss, fullgraph=True) if compiled else grads_of_loss)()
    assert all(p.grad is None for p in net.parameters())  # .grad is left alone
    (net(x) ** 2).mean().backward()
    assert torch.allclose(aux, x.sum()) and torch.allclose(loss, (net(x) ** 2).mean())
    for name, p in net.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5, 1e6])
def test_adam_matches_torch_adam_with_clipping_and_lr_changed_in_place(max_grad_norm):
    ours_net, torch_net = _net(), _net()
    ours = Adam(ours_net, lr=1e-2, max_grad_norm=max_grad_norm)
    reference = torch.optim.Adam(torch_net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        if step == 6:  # a schedule changes the learning rate in place
            ours.lr.fill_(3e-3)
            reference.param_groups[0]["lr"] = 3e-3
        grads = {n: torch.randn(p.shape, generator=gen) * (step + 1) for n, p in ours_net.named_parameters()}
        for n, p in torch_net.named_parameters():
            p.grad = grads[n].clone()
        expected_norm = nn.utils.clip_grad_norm_(torch_net.parameters(),
                                                 max_grad_norm if max_grad_norm > 0 else float("inf"))
        reference.step()
        norm = ours.step(grads)
        assert torch.allclose(norm, expected_norm, rtol=1e-5)
        for a, b in zip(ours_net.parameters(), torch_net.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), step


def _small_learn_step(learner: str = "eager"):
    ring = ReplayRing(200, 2, (4,), torch.device("cpu"), n_step=3)
    ring.start(torch.zeros(2, 4))
    for _ in range(50):
        ring.add(torch.randint(0, 3, (2,)), torch.randn(2), torch.rand(2) < 0.1, torch.zeros(2, dtype=torch.bool),
                 torch.randn(2, 4))
    q = QNetwork((4,), 3, (16, 16))
    return ddqn.make_learn_step(ring.sampler(8), q, copy.deepcopy(q).requires_grad_(False), Adam(q, 1e-3, 10.0),
                                tau=0.005, target_update_interval=2, learner=learner)


@pytest.mark.slow
def test_ddqn_learn_step_is_one_graph():
    # loss.backward() and torch.optim's step would each break it (9 graphs before).
    explanation = torch._dynamo.explain(_small_learn_step())()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_the_compiled_cpu_learner_calls_its_kernels_from_cpp():
    # The same maths as eager: test_ddqn.py::test_learner_modes_change_speed_not_maths.
    torch._dynamo.reset()  # compile afresh, so that the code is generated here
    stats, code = run_and_get_code(_small_learn_step("compile"))
    code = "\n".join(code)
    # Python's wrapper is `def call(args)`, calling kernel after kernel; C++'s is this entry point.
    assert "inductor_entry_impl" in code and "def call(" not in code
    assert torch.isfinite(stats.loss) and stats.loss > 0


def test_the_bias_corrections_powers_stay_those_of_the_step_count_over_a_long_run_and_a_resume():
    net = nn.Linear(2, 1)
    opt = Adam(net, lr=1e-3)
    grads = {n: torch.ones_like(p) for n, p in net.named_parameters()}
    for _ in range(5_000):
        opt.step(grads)
    expected = torch.tensor([0.9, 0.999], dtype=torch.float64) ** 5_000
    assert opt.steps.item() == 5_000
    assert torch.allclose(opt.beta_powers, expected, rtol=1e-12, atol=0)
    resumed = Adam(nn.Linear(2, 1), lr=1e-3)
    resumed.load_state_dict(opt.state_dict())
    assert torch.equal(resumed.beta_powers, opt.beta_powers)
    old_state = {k: v for k, v in opt.state_dict().items() if k != "beta_powers"}  # saved before they were kept
    resumed.load_state_dict(old_state)
    assert torch.allclose(resumed.beta_powers, expected, rtol=1e-12, atol=0)
