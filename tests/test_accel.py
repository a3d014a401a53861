"""The learner modes' compilation: C++-called kernels on the CPU, and the fallbacks when
compiling fails (with the C++ wrapper, then at all)."""
import copy

import torch
from torch._inductor.utils import run_and_get_code

from fastrl import accel
from fastrl.algos import ddqn
from fastrl.buffer import ReplayRing
from fastrl.nets import QNetwork
from fastrl.optim import Adam


def test_the_compiled_cpu_learner_calls_its_kernels_from_cpp():
    # The same maths as eager: test_ddqn.py::test_learner_modes_change_speed_not_maths.
    torch._dynamo.reset()  # compile afresh, so that the code is generated here
    ring = ReplayRing(200, 2, (4,), torch.device("cpu"), n_step=3)
    ring.start(torch.zeros(2, 4))
    for _ in range(50):
        ring.add(torch.randint(0, 3, (2,)), torch.randn(2), torch.rand(2) < 0.1, torch.zeros(2, dtype=torch.bool),
                 torch.randn(2, 4))
    q = QNetwork((4,), 3, (16, 16))
    learn = ddqn.make_learn_step(ring.sampler(8), q, copy.deepcopy(q).requires_grad_(False), Adam(q, 1e-3, 10.0),
                                 tau=0.005, target_update_interval=1, learner="compile")
    stats, code = run_and_get_code(learn)
    code = "\n".join(code)
    # Python's wrapper is `def call(args)`, calling kernel after kernel; C++'s is this entry point.
    assert "inductor_entry_impl" in code and "def call(" not in code
    assert torch.isfinite(stats.loss) and stats.loss > 0


def test_a_failing_compile_falls_back_one_way_at_a_time_and_says_so_once(monkeypatch, capsys):
    real_compile = torch.compile
    fails = set()  # "wrapper": compiling with the C++ wrapper fails; "plain": compiling without it fails

    def compile_that_may_fail(fn, **kwargs):
        way = "wrapper" if kwargs.get("options", {}).get("cpp_wrapper") else "plain"
        compiled = real_compile(fn, **kwargs)

        def call(*args):
            if way in fails:
                raise RuntimeError(f"no C++ compiler for the {way} build\nmore lines")
            return compiled(*args)

        return call

    monkeypatch.setattr(torch, "compile", compile_that_may_fail)

    def double(x):
        return x * 2

    x = torch.arange(3.0)
    cpu = torch.device("cpu")
    fails.add("wrapper")
    fn = accel.compile_fn(double, device=cpu)
    assert torch.equal(fn(x), x * 2) and torch.equal(fn(x), x * 2)
    assert capsys.readouterr().err.splitlines() == [
        "fastrl: torch.compile with the C++ wrapper failed for double (RuntimeError: no C++ compiler for the "
        "wrapper build); running it compiled without the C++ wrapper"]

    fails.add("plain")
    fn = accel.compile_fn(double, device=cpu)
    assert torch.equal(fn(x), x * 2) and torch.equal(fn(x), x * 2)
    assert capsys.readouterr().err.splitlines() == [
        "fastrl: torch.compile with the C++ wrapper failed for double (RuntimeError: no C++ compiler for the "
        "wrapper build); running it compiled without the C++ wrapper",
        "fastrl: torch.compile failed for double (RuntimeError: no C++ compiler for the plain build); running it "
        "eagerly"]

    # Off the CPU (CUDA, where the CUDA graph removes the calls instead) there is no C++ wrapper to try.
    fn = accel.compile_fn(double)
    assert torch.equal(fn(x), x * 2)
    assert capsys.readouterr().err.splitlines() == [
        "fastrl: torch.compile failed for double (RuntimeError: no C++ compiler for the plain build); running it "
        "eagerly"]
