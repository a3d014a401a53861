"""compile_fn's fallbacks when compiling fails: with the C++ wrapper, then at all. (That
the CPU learner's kernels are called from C++: test_optim.py.)"""
import pytest
import torch

from fastrl import accel


@pytest.mark.slow
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
