"""`fastrl profile`: phase times that add up, and a verdict that names the real bottleneck."""
import json
import time

import pytest

import fastrl
from fastrl import timing
from fastrl.cli import main
from fastrl.optim import Adam
from fastrl.progress import Progress
from fastrl.timing import Phases

SMALL = dict(hidden=(16, 16), batch_size=32, buffer_size=5_000, learning_starts=200, replay_ratio=0.25,
             learner="eager", backend="sync", num_envs=2, eval_interval=0, stop_on_solve=False,
             total_steps=10**9, progress=False, profile=True, profile_steps=600, trace_cycles=3)


def profile(tmp_path, **overrides):
    config = fastrl.make_config(**{**SMALL, "run_dir": str(tmp_path / "p"), **overrides})
    return fastrl.train(config)["profile"]


@pytest.mark.slow
def test_phases_add_up_to_wall_time_and_verdict_names_slow_env(tmp_path):
    report = profile(tmp_path, env_id="fastrl-test/Slow-v0")
    covered = sum(report["phase_s"].values()) / report["wall_s"]
    # Stated tolerance: the named phases cover at least 90% of the wall time, never more.
    assert 0.90 <= covered <= 1.0 + 1e-9, report["phase_s"]
    assert report["env_steps"] >= 600 and report["updates"] > 0
    assert report["bottleneck"] == "env" and "--num-envs" in report["knob"]
    # Each env step sleeps 2 ms and the sync backend steps 2 envs in turn: >= 4 ms per cycle.
    assert report["phase_s"]["env"] >= 0.004 * report["env_steps"] / 2 * 0.9


@pytest.mark.slow
def test_verdict_names_the_learner_when_the_update_is_slow(tmp_path, monkeypatch):
    real = Adam.step

    def slow_step(self, grads):
        time.sleep(0.01)
        return real(self, grads)

    monkeypatch.setattr(Adam, "step", slow_step)
    report = profile(tmp_path, env_id="CartPole-v1", replay_ratio=1.0)
    assert report["bottleneck"] == "learn" and "--replay-ratio" in report["knob"]
    assert report["phase_s"]["optimizer_step"] > 0.5 * report["wall_s"]


@pytest.mark.slow
def test_profile_command_prints_table_and_writes_trace(tmp_path, capfd):
    code = main(["profile", "--env", "CartPole-v1", "--steps", "400", "--learner", "eager", "--backend", "sync",
                 "--learning-starts", "100", "--batch-size", "16", "--hidden", "16", "--trace-cycles", "2",
                 "--run-dir", str(tmp_path / "cli")])
    out, err = capfd.readouterr()
    assert code == 0
    assert "profiler_start" not in err and "profiler_stop" not in err  # the profiler's native log lines
    for text in ("phase", "share", "env steps/s", "updates/s", "bottleneck:", "forward_backward",
                 "optimizer_step", "top operators", "trace"):
        assert text in out, text
    trace = json.loads((tmp_path / "cli" / "trace.json").read_text())
    assert trace["traceEvents"], "the Chrome trace holds events"
    assert (tmp_path / "cli" / "top_ops.txt").read_text().strip()
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["profile"]["bottleneck"] in out


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ddqn", "reinforce"])
def test_progress_total_is_the_steps_the_profile_takes(tmp_path, monkeypatch, algo):
    # Warm-up, timed steps and traced cycles: the line must not read "5,008/3,000 steps".
    totals = []
    monkeypatch.setattr(Progress, "close", lambda self: totals.append(self.total))
    overrides = dict(algo="reinforce", rollout_steps=16, learning_starts=0) if algo == "reinforce" else {}
    config = fastrl.make_config(**{**SMALL, "env_id": "CartPole-v1", "num_envs": 4, "profile_steps": 301,
                                   "run_dir": str(tmp_path / algo), **overrides})
    summary = fastrl.train(config)
    assert summary["profile"] is not None
    assert totals == [summary["env_steps"]]


def test_nested_phases_are_exclusive_and_disabled_timers_do_nothing(monkeypatch):
    clock = [100.0]  # the timers' clock, moved by hand: exact, whatever the machine's load
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    phases = Phases()
    with phases("outer"):
        clock[0] += 0.02
        with phases("inner"):
            clock[0] += 0.03
        clock[0] += 0.005
    assert phases.seconds == pytest.approx({"outer": 0.025, "inner": 0.03})
    off = Phases(enabled=False)
    with off("x"):
        pass
    assert off.seconds == {}
