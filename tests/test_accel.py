"""compile_fn's fallbacks when compiling fails: with the C++ wrapper, then at all. (That
the CPU learner's kernels are called from C++: test_optim.py.)"""
import os
import subprocess
import sys

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

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


@pytest.mark.slow
def test_a_compile_that_fails_while_the_run_stops_runs_eagerly_at_once(monkeypatch, capsys):
    """A Ctrl-C reaches inductor's compiler processes too: the compile it kills must not be
    followed by a second compile from scratch, which the stop would wait for."""
    tried = []

    def compile_killed_by_the_stop(fn, **kwargs):
        def call(*args):
            tried.append(kwargs.get("options", {}).get("cpp_wrapper", False))
            raise RuntimeError("C++ compile error: g++ died with <Signals.SIGINT: 2>")

        return call

    monkeypatch.setattr(torch, "compile", compile_killed_by_the_stop)
    x = torch.arange(3.0)
    fn = accel.compile_fn(lambda v: v * 2, device=torch.device("cpu"))
    monkeypatch.setattr(accel, "STOPPING", accel.threading.Event())
    accel.STOPPING.set()
    assert torch.equal(fn(x), x * 2) and torch.equal(fn(x), x * 2)
    assert tried == [True]  # the C++-wrapper compile only: no second compile without the wrapper
    assert capsys.readouterr().err.splitlines() == [
        "fastrl: torch.compile with the C++ wrapper failed for <lambda> (RuntimeError: C++ compile error: g++ died "
        "with <Signals.SIGINT: 2>); running it eagerly, as the run is stopping"]


def test_a_stop_request_marks_the_process_stopping_until_it_is_uninstalled():
    import signal

    from fastrl.run.signals import StopRequest

    stop = StopRequest()
    with stop.installed():
        assert not accel.STOPPING.is_set()
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and accel.STOPPING.is_set()
    assert not accel.STOPPING.is_set()


def test_compiled_kernels_are_kept_in_the_users_cache_unless_the_user_chose_a_folder(monkeypatch, tmp_path):
    """torch's default under /tmp is emptied by a reboot, and the next run compiles cold."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    accel.compile_fn(lambda x: x + 1, device=torch.device("cpu"))  # compiles lazily: nothing runs yet
    chosen = tmp_path / "cache" / "fastrl" / "torchinductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen) and chosen.is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    accel.compile_fn(lambda x: x + 1, device=torch.device("cpu"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's choice stands
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # the cache folder cannot be made there
    accel.compile_fn(lambda x: x + 1, device=torch.device("cpu"))
    # torch's own default (torch.compile sets it), rather than a compile that fails
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir()


def test_inductors_precompiled_header_is_off_unless_the_user_chose(monkeypatch, tmp_path):
    """A process builds that header before its first C++ compile even when every kernel is
    cached, and it lives under /tmp: after a reboot a cached learner step paid for it."""
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", raising=False)
    monkeypatch.setattr(inductor_config, "cpp_cache_precompile_headers", True)
    accel.configure_inductor()
    assert inductor_config.cpp_cache_precompile_headers is False
    monkeypatch.setenv("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "1")
    monkeypatch.setattr(inductor_config, "cpp_cache_precompile_headers", True)
    accel.configure_inductor()
    assert inductor_config.cpp_cache_precompile_headers is True  # the user's choice stands


def test_a_fresh_process_keeps_its_kernels_in_the_users_cache(tmp_path):
    """In a new interpreter, where importing inductor's config would set torch's /tmp default."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code = ("import os; from fastrl import accel; accel.configure_inductor(); "
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path / "fastrl" / "torchinductor")


def test_a_home_whose_path_has_a_space_keeps_torchs_cache_folder(tmp_path):
    """Inductor's C++ build commands break on such a path: every compile failed, and the
    learner ran eagerly."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "my cache")
    code = ("import os; from fastrl import accel; accel.configure_inductor(); "
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == default_cache_dir() and " " not in out.strip()


def test_vector_instructions_come_from_the_cpus_flags_unless_the_user_chose(monkeypatch, tmp_path):
    """Inductor's own check builds and loads a test library per candidate: a third of a
    first compile, and a Python process per candidate in every process."""
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
    accel.configure_inductor()
    assert inductor_config.cpp.vec_isa_ok is True
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
    monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", "0")
    accel.configure_inductor()
    assert inductor_config.cpp.vec_isa_ok is None  # the user's choice stands (torch reads it at import)


@pytest.mark.slow
def test_the_cpus_flags_pick_the_vector_instructions_that_inductors_checks_pick(tmp_path):
    """What the skipped checks would have chosen on this machine, so the kernels are the same."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_VEC_ISA_OK"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)
    pick = "from torch._inductor.cpu_vec_isa import pick_vec_isa; print(pick_vec_isa())"
    trusted, checked = (
        subprocess.run([sys.executable, "-c", setup + pick], env=env, capture_output=True, text=True, check=True,
                       timeout=300).stdout.strip()
        for setup in ("from fastrl import accel; accel.configure_inductor(); ", ""))
    assert trusted == checked and trusted, (trusted, checked)


def flushes_denormals() -> bool:
    """Whether this thread's float32 arithmetic now reads and writes denormals as zero."""
    tiny = torch.tensor([1000], dtype=torch.int32).view(torch.float32)  # 1.4e-42, by its bits
    return (tiny * 2).view(torch.int32).item() == 0  # else 2000: the bits of 2.8e-42


def test_denormals_are_flushed_to_zero_inside_and_not_after():
    assert not flushes_denormals()
    with accel.denormals_flushed():
        assert flushes_denormals()
    assert not flushes_denormals()
    with pytest.raises(KeyboardInterrupt), accel.denormals_flushed():
        raise KeyboardInterrupt
    assert not flushes_denormals()


@pytest.mark.parametrize("algo", ["ddqn", "reinforce"])
def test_a_training_run_learns_with_denormals_flushed_and_leaves_them_unflushed(tmp_path, monkeypatch, algo):
    from fastrl import make_config, train
    from fastrl.algos import ddqn, reinforce
    module, name = (ddqn, "make_learn_step") if algo == "ddqn" else (reinforce, "make_update")
    real, seen = getattr(module, name), []

    def recording(*args, **kwargs):
        learn = real(*args, **kwargs)

        def learn_and_record(*a):
            seen.append(flushes_denormals())
            return learn(*a)
        return learn_and_record

    monkeypatch.setattr(module, name, recording)
    train(make_config(env_id="CartPole-v1", algo=algo, total_steps=800, learning_starts=200, num_envs=4,
                      eval_interval=0, eval_episodes=2, eval_envs=2, learner="eager", run_dir=str(tmp_path),
                      progress=False))
    assert seen and all(seen)
    assert not flushes_denormals()
