"""Lifecycle: Ctrl-C and SIGTERM, hung envs, killed workers and trainers, envs that fail to
make, step or close. Each test runs whole processes: all are marked slow."""
import contextlib
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_envs import BACKENDS, CPU  # noqa: E402

from fastrl.collector import Collector
from fastrl.envs import make_vector_env
from fastrl.errors import WorkerDied
from fastrl.run.signals import StopRequest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["async-plain", "async-grouped"])
def test_closing_after_an_interrupted_step_wait_does_not_hang(name):
    # Ctrl-C inside step_wait(), after the reply was read but before the step was
    # recorded, leaves a step "in flight" with nothing left to collect.
    backend, workers = BACKENDS[name]
    envs = make_vector_env("CartPole-v1", 4, backend, num_workers=workers)
    collector = Collector(envs, CPU)
    collector.reset(seed=0)
    collector.step_async(torch.zeros(4, dtype=torch.int64))
    inner = envs.workers if name == "async-grouped" else envs
    for pipe in inner.parent_pipes:
        pipe.recv_bytes()
    closer = threading.Thread(target=collector.close, kwargs={"timeout": 0.5}, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "close() hangs"
    assert not any(p.is_alive() for p in inner.processes)


@pytest.mark.filterwarnings("error:.*Calling `close` while waiting")  # gymnasium's: close() leaves it unsaid
@pytest.mark.parametrize("name", ["async-plain", "async-grouped"])
def test_closing_after_an_interrupt_in_the_middle_of_a_reply_does_not_hang(name):
    # A second Ctrl-C can land inside step_wait() between a reply's length header and its
    # body. Reading that pipe again would take the body's first bytes for a length and wait
    # for a message that never comes, so close() must terminate the workers instead.
    backend, workers = BACKENDS[name]
    envs = make_vector_env("CartPole-v1", 4, backend, num_workers=workers)
    inner = envs.workers if name == "async-grouped" else envs
    collector = Collector(envs, CPU)
    collector.reset(seed=0)
    collector.step_async(torch.zeros(4, dtype=torch.int64))

    def step_wait_interrupted_mid_reply(timeout=None):
        pipe = inner.parent_pipes[0]
        assert pipe.poll(10)
        os.read(pipe.fileno(), 4)  # the length header only
        raise KeyboardInterrupt

    envs.step_wait = step_wait_interrupted_mid_reply
    with pytest.raises(KeyboardInterrupt):
        collector.step_wait()
    del envs.step_wait
    closer = threading.Thread(target=collector.close, kwargs={"timeout": 2.0}, daemon=True)
    closer.start()
    closer.join(15)
    assert not closer.is_alive(), "close() hangs"
    assert not any(p.is_alive() for p in inner.processes)


def test_a_stop_request_is_a_flag_until_the_second_signal_and_then_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}
    for first, second in [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)]:
        with StopRequest().installed() as stop:
            os.kill(os.getpid(), first)  # handled before os.kill returns: no exception, a flag
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), second)
                time.sleep(1)  # not reached
        assert {s: signal.getsignal(s) for s in StopRequest.SIGNALS} == before
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with StopRequest().installed() as stop:  # an ignored signal stays ignored
            os.kill(os.getpid(), signal.SIGTERM)
            assert not stop.requested and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def training_process(tmp_path: Path, *args: str):
    """`fastrl train` on CartPole (eager learner, 4 envs, `args`) in a process group of its
    own, as a terminal runs it; yields the process once its event file exists (the run has
    started). Whatever is left of the group is killed on the way out."""
    cmd = [sys.executable, "-m", "fastrl", "train", "--env", "CartPole-v1", "--learner", "eager", "--num-envs", "4",
           "--no-progress", *args, "--run-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob("events.out.tfevents.*")) and time.time() < deadline:
            time.sleep(0.1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):  # e.g. Ctrl-C ignored: leave nothing running
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def no_process_left(proc: subprocess.Popen) -> bool:
    time.sleep(0.5)
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return True
    return False


READY_FIRST = ("--collection", "ready-first", "--num-workers", "2")
PLAIN = ("--num-workers", "4")  # one process per env: gymnasium's AsyncVectorEnv (errors raised, not logged)


@pytest.mark.parametrize("evaluation, stop, collection", [
    ("none", "ctrl-c", ()), ("in flight", "ctrl-c", ()), ("none", "sigterm", ()), ("none", "ctrl-c", READY_FIRST),
    ("none", "sigterm to the group", ()), ("none", "sigterm to the group", PLAIN),
    ("in flight", "sigterm to the group", ())],
    ids=["ctrl-c", "ctrl-c during evaluation", "sigterm", "ctrl-c, ready-first", "sigterm to the group",
         "sigterm to the group, plain AsyncVectorEnv", "sigterm to the group during evaluation"])
def test_ctrl_c_or_sigterm_stops_an_async_training_run_and_saves(tmp_path, evaluation, stop, collection):
    # "in flight": an evaluation that never ends (a million episodes, no screening) is running
    # in its process, and the trainer soon waits for it to submit the next one.
    evals = ["--eval-interval", "0"] if evaluation == "none" else [
        "--eval-interval", "400", "--eval-episodes", "1000000", "--no-stop-on-solve", "--learning-starts", "100",
        "--checkpoint-interval", "500steps"]
    with training_process(tmp_path, "--total-steps", "10000000", "--log-interval", "0.2", *evals,
                          *collection) as proc:
        def event_bytes():
            return sum(f.stat().st_size for f in tmp_path.glob("events.out.tfevents.*"))

        deadline = time.time() + 60
        if evaluation == "none":
            while event_bytes() == 0 and time.time() < deadline:
                time.sleep(0.1)
            for _ in range(2):  # the loop has logged twice: it is training (the first growth may be the config)
                grown = event_bytes()
                while event_bytes() == grown and time.time() < deadline:
                    time.sleep(0.1)
        else:
            while not (tmp_path / "state.pt").exists() and time.time() < deadline:  # saved after the submission
                time.sleep(0.1)
            assert (tmp_path / "state.pt").exists()
            time.sleep(1.0)
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        elif stop == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)  # `kill PID`, a container's stop: the trainer only
        else:  # systemd's stop, Slurm's preemption: every process, the workers die with the trainer's stop
            os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert no_process_left(proc)  # no env worker or evaluation process is left behind
    assert proc.returncode == 130, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] and summary["env_steps"] > 0
    assert (tmp_path / "checkpoint.pt").exists()
    assert "Traceback" not in err and "error" not in err
    heard = "Ctrl-C" if stop == "ctrl-c" else "SIGTERM"
    assert out.count(f"{heard}: the run stops after the step in progress and saves") == 1, out


def hanging_run(run_dir: Path) -> list[str]:
    """`fastrl train` arguments for 4 envs whose step never returns after their 200th;
    each marks its hang in run_dir/hung (see wait_until_the_run_hangs)."""
    (run_dir / "hung").mkdir()
    return ["--env", "scripted_envs:fastrl-test/Hanging-v0", "--env-kwargs", "after=200", f"mark={run_dir / 'hung'}",
            "--total-steps", "1e7", "--eval-interval", "0", "--log-interval", "0.1"]


def wait_until_the_run_hangs(run_dir: Path) -> None:
    # One env's hang is enough: the others wait behind it (in its worker) or for it (the
    # trainer's next step needs every env's).
    deadline = time.time() + 60
    while not any((run_dir / "hung").iterdir()) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the trainer is waiting for it by now


def read_until(proc: subprocess.Popen, text: str, seconds: float = 10) -> str:
    """What the trainer printed until `text` (read from the pipe itself, not a buffer)."""
    out, deadline = b"", time.time() + seconds
    while text.encode() not in out and time.time() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            out += os.read(proc.stdout.fileno(), 1 << 16)
    assert text.encode() in out, out
    return out.decode()


def assert_stopped_at_the_hang_and_saved(proc: subprocess.Popen, run_dir: Path, err: str) -> None:
    assert proc.returncode == 130 and "Traceback" not in err, err
    summary = json.loads((run_dir / "summary.json").read_text())
    # Every env took its 200 steps (episodes of 3, each followed by an autoreset step) and hangs in the next.
    assert summary["interrupted"] and summary["error"] is None and summary["env_steps"] == 4 * (200 + 200 // 3)
    assert summary["checkpoint"] == str(run_dir / "checkpoint.pt")


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stop_while_an_env_hangs_is_acknowledged_at_once_and_a_second_signal_stops_and_saves(
        tmp_path, monkeypatch, stop):
    # The cycle the first signal waits for never ends. The user is told at once that the
    # signal was heard, and how to stop.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the trainer imports scripted_envs
    with training_process(tmp_path, *hanging_run(tmp_path)) as proc:
        wait_until_the_run_hangs(tmp_path)
        send = (lambda s: os.killpg(proc.pid, s)) if stop == "ctrl-c" else (lambda s: os.kill(proc.pid, s))
        send(signal.SIGINT if stop == "ctrl-c" else signal.SIGTERM)
        read_until(proc, f"{'Ctrl-C' if stop == 'ctrl-c' else 'SIGTERM'}: the run stops after the step in progress "
                         f"and saves")
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting for the hung step
        send(signal.SIGINT if stop == "ctrl-c" else signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert no_process_left(proc)  # the hung worker too
    assert_stopped_at_the_hang_and_saved(proc, tmp_path, err)


def test_one_sigterm_while_an_env_hangs_stops_and_saves_after_a_grace_period(tmp_path, monkeypatch):
    # A container's stop (docker stop, a pod's deletion) sends one SIGTERM, then SIGKILL
    # 10 or 30 s later. A run whose env hangs must not wait for a second signal.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    with training_process(tmp_path, *hanging_run(tmp_path)) as proc:
        wait_until_the_run_hangs(tmp_path)
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.time()
        read_until(proc, "SIGTERM: the run stops after the step in progress and saves (it stops at once, still "
                         "saving, on a second Ctrl-C or SIGTERM, or if that step is not done in 5 s)")
        _, err = proc.communicate(timeout=60)
        assert no_process_left(proc)
    assert_stopped_at_the_hang_and_saved(proc, tmp_path, err)
    saved_in = (tmp_path / "summary.json").stat().st_mtime - sent
    # Forced once the grace period is over, and saved before docker's SIGKILL, 10 s after the SIGTERM.
    assert StopRequest.GRACE_S <= saved_in < 10.0, saved_in


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c twice"])
@pytest.mark.parametrize("worker", ["ignores sigterm", "stopped (SIGSTOP)"])
def test_a_stop_never_waits_for_a_worker_that_sigterm_cannot_end(tmp_path, monkeypatch, stop, worker):
    # The forced stop kills (SIGKILL) a worker that SIGTERM has not ended, and the run is
    # saved within the 10 s a container's stop allows.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    args = hanging_run(tmp_path)
    if worker == "ignores sigterm":
        args[args.index("--env-kwargs") + 1:args.index("--env-kwargs") + 1] = ["ignore_sigterm=true"]
    with training_process(tmp_path, *args) as proc:
        wait_until_the_run_hangs(tmp_path)
        if worker == "stopped (SIGSTOP)":
            for pid in children(proc):
                os.kill(pid, signal.SIGSTOP)
        sent = time.time()
        if stop == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
            read_until(proc, "Ctrl-C: the run stops after the step in progress and saves")
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.time() - sent
        assert no_process_left(proc)
    assert_stopped_at_the_hang_and_saved(proc, tmp_path, err)
    assert took < 10.0, took


def children(proc: subprocess.Popen) -> list[int]:
    """The trainer's child processes, oldest first (the env worker, then the evaluation process)."""
    return sorted(int(pid) for pid in (Path("/proc") / str(proc.pid) / "task" / str(proc.pid) / "children")
                  .read_text().split())


def cpu_seconds(pid: int) -> float:
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def signal_on_call(make, calls: int):
    """Wraps a factory of step functions (make_learn_step, make_act): the function it
    makes sends this process SIGINT (Ctrl-C) during its `calls`-th call."""
    def wrapped_make(*args, **kwargs):
        step, count = make(*args, **kwargs), 0

        def signalling_step(*a):
            nonlocal count
            count += 1
            if count == calls:
                os.kill(os.getpid(), signal.SIGINT)
            return step(*a)
        return signalling_step
    return wrapped_make


@pytest.mark.parametrize("cycle", ["ddqn updates", "reinforce rollout", "reinforce grad steps"])
def test_a_stop_ends_a_long_cycle_at_once(tmp_path, monkeypatch, cycle):
    # One cycle: 4 envs x replay_ratio 1000 = 4,000 DDQN updates, a REINFORCE rollout of
    # 20,000 vector steps, or 1,000 REINFORCE gradient steps after a rollout of 64. Ctrl-C
    # during the 5th update or act stops there, not at the cycle's end.
    import fastrl
    from fastrl.algos import ddqn, reinforce
    if cycle == "ddqn updates":
        monkeypatch.setattr(ddqn, "make_learn_step", signal_on_call(ddqn.make_learn_step, 5))
        settings = dict(algo="ddqn", replay_ratio=1000.0, learning_starts=100)
    elif cycle == "reinforce rollout":
        monkeypatch.setattr(reinforce, "make_act", signal_on_call(reinforce.make_act, 5))
        settings = dict(algo="reinforce", rollout_steps=20_000)
    else:
        monkeypatch.setattr(reinforce, "make_update", signal_on_call(reinforce.make_update, 5))
        settings = dict(algo="reinforce", rollout_steps=64, grad_steps=1000)
    config = fastrl.make_config(env_id="CartPole-v1", num_envs=4, backend="sync", learner="eager",
                                total_steps=10_000_000, eval_interval=0, progress=False, run_dir=str(tmp_path),
                                time_limit_s=120, **settings)  # a signal lost: a failure, not a hang
    summary = fastrl.train(config)
    assert summary["interrupted"] and (tmp_path / "checkpoint.pt").exists()
    if cycle == "reinforce rollout":  # the 5th step completes, no more, and nothing is learned
        assert summary["env_steps"] == 5 * 4 and summary["updates"] == 0, summary
    else:  # the update under way when the signal came ends; no more
        assert summary["updates"] == 5, summary
        assert cycle == "ddqn updates" or summary["env_steps"] == 64 * 4, summary


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm to the group", "evaluation process killed"])
def test_a_stop_or_a_death_during_the_final_evaluation_still_saves(tmp_path, how):
    # No evaluation during the loop, which ends within seconds; the final evaluation
    # (a million episodes) would never end. The evaluation process, idle until then,
    # burning CPU shows that the final evaluation is under way. SIGTERM to the whole group
    # (systemd, Slurm) kills the evaluation process too: part of the stop, not an error.
    with training_process(tmp_path, "--total-steps", "2000", "--eval-interval", "0",
                          "--eval-episodes", "1000000") as proc:
        evaluation = children(proc)[-1]
        deadline = time.time() + 60
        while cpu_seconds(evaluation) < 1.0 and time.time() < deadline:
            time.sleep(0.1)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        elif how == "sigterm to the group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:  # the OOM killer
            os.kill(evaluation, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert no_process_left(proc)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env_steps"] == 2000 and summary["final_eval_episodes"] == 0  # the loop had finished
    assert (tmp_path / "checkpoint.pt").exists()
    if how == "evaluation process killed":
        assert proc.returncode == 1, err
        [line] = err.strip().splitlines()
        assert line == (f"fastrl train: error: the evaluation process (pid {evaluation}) ended unexpectedly "
                        f"(killed by signal {int(signal.SIGKILL)})")
        assert not summary["interrupted"] and "ended unexpectedly" in summary["error"]
    else:
        assert proc.returncode == 130, err
        assert summary["interrupted"] and summary["error"] is None
        assert "Traceback" not in err and "error" not in err


@pytest.mark.filterwarnings("error:.*Calling `close` while waiting")  # gymnasium's: close() leaves it unsaid
@pytest.mark.parametrize("victim", [0, -1], ids=["first worker", "last worker"])
@pytest.mark.parametrize("when", ["between steps", "step in flight"])
@pytest.mark.parametrize("name", ["async-plain", "async-grouped"])
def test_a_dead_env_worker_is_an_error_naming_it_and_close_still_works(name, when, victim):
    # The first worker's death with a step in flight leaves the other workers' replies
    # unread in their pipes: close() must not read them (gymnasium's own close would, and
    # hit the dead worker's end of file first).
    backend, workers = BACKENDS[name]
    envs = make_vector_env("CartPole-v1", 4, backend, None, workers)
    collector = Collector(envs, CPU)
    try:
        collector.reset(seed=0)
        actions = torch.zeros(4, dtype=torch.int64)
        collector.step_async(actions)
        collector.step_wait()
        victim = envs.processes[victim]
        if when == "step in flight":
            os.kill(victim.pid, signal.SIGSTOP)  # it dies before it can reply
            collector.step_async(actions)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        with pytest.raises(WorkerDied, match=rf"env worker process \(pid {victim.pid}\) ended unexpectedly "
                                             rf"\(killed by signal {int(signal.SIGKILL)}\)"):
            if when == "step in flight":
                collector.step_wait()
            else:
                collector.step_async(actions)
    finally:
        collector.close()
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("collection", [(), READY_FIRST, PLAIN],
                         ids=["lockstep", "ready-first", "plain AsyncVectorEnv"])
def test_a_training_run_whose_worker_dies_saves_and_says_so_in_one_line(tmp_path, collection):
    with training_process(tmp_path, "--total-steps", "10000000", "--log-interval", "0.2",
                          "--eval-interval", "0", *collection) as proc:
        time.sleep(1.0)  # training
        pids = children(proc)
        assert pids  # the env worker and the evaluation process
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert no_process_left(proc)
    assert proc.returncode == 1, err
    [line] = err.strip().splitlines()  # nothing but the error: no traceback, no warning
    assert line.startswith("fastrl train: error: ") and "ended unexpectedly" in line
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "ended unexpectedly" in summary["error"] and summary["env_steps"] > 0
    assert (tmp_path / "checkpoint.pt").exists()


COLLECTIONS = {"plain AsyncVectorEnv": ["--num-workers", "4"], "sync": ["--backend", "sync"]}  # else grouped


def failing_env_run(env: str, run_dir: Path, *options: str) -> list[str]:
    """`fastrl train` arguments for a scripted env that fails: 4 envs, an eager learner,
    evaluations of 4 episodes on 2 envs."""
    return ["train", "--env", env, "--learner", "eager", "--num-envs", "4", "--learning-starts", "40",
            "--eval-episodes", "4", "--eval-envs", "2", "--no-progress", "--run-dir", str(run_dir), *options]


@pytest.mark.parametrize("where", ["grouped workers", "plain AsyncVectorEnv", "sync", "evaluation"])
def test_an_env_that_raises_stops_the_run_with_its_own_traceback_and_one_line(where, tmp_path, capsys):
    from fastrl.cli import main
    env = "fastrl-test/FailingWhenEvaluated-v0" if where == "evaluation" else "fastrl-test/FailingStep-v0"
    args = failing_env_run(env, tmp_path, "--total-steps", "5000", "--eval-interval", "40", *COLLECTIONS.get(where, []))
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    raised = (("ValueError: no simulator for evaluation seeds", 'raise ValueError("no simulator') if
              where == "evaluation" else
              ("ValueError: step 31 failed on purpose", 'raise ValueError("step %d failed on purpose"'))
    # The env's own traceback (not gymnasium's warnings, nor fastrl's frames), then one line.
    assert err[0] == "Traceback (most recent call last):" and err[-2] == raised[0]
    assert any(line.strip().startswith(raised[1]) for line in err) and "fastrl/training.py" not in "\n".join(err)
    assert err[-1] == f"fastrl train: error: an env raised {raised[0]}" + (
        " (in the evaluation process)" if where == "evaluation" else "")
    assert multiprocessing.active_children() == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["error"].rstrip().endswith(raised[0]) and (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("where", ["grouped workers", "plain AsyncVectorEnv", "sync"])
def test_when_one_env_raises_every_env_is_still_closed(where, tmp_path, capsys):
    # The workers whose envs did not raise close them rather than being terminated: an env
    # may hold a simulator process, which a terminated worker would leave running.
    from fastrl.cli import main
    marks = tmp_path / "marks"
    marks.mkdir()
    workers = ["--num-workers", "2"] if where == "grouped workers" else COLLECTIONS.get(where, [])
    args = failing_env_run("fastrl-test/OneFailingStep-v0", tmp_path / "run", "--env-kwargs", f"mark={marks}",
                           "--total-steps", "5000", "--eval-interval", "0", *workers)
    assert main(args) == 1
    assert capsys.readouterr().err.endswith("error: an env raised ValueError: this env failed, the others did not\n")
    assert len(list(marks.glob("closed-*"))) == 4 and multiprocessing.active_children() == []


@pytest.mark.parametrize("where", ["trainer", "grouped workers", "plain AsyncVectorEnv", "sync, evaluation"])
def test_an_env_that_cannot_be_made_is_its_traceback_and_one_line_and_leaves_no_process(where, tmp_path, capsys):
    from fastrl.cli import main
    env = "fastrl-test/Unmakeable-v0" if where == "trainer" else "fastrl-test/UnmakeableInWorkers-v0"
    args = failing_env_run(env, tmp_path, "--total-steps", "400", "--eval-interval", "200",
                           *COLLECTIONS.get(where.partition(",")[0], []))
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    raised = f"RuntimeError: the licence is held by process {os.getpid()}"
    # Once: the env's traceback, from the process that tried to make it (no worker prints its own).
    assert err[0] == "Traceback (most recent call last):" and err[-2] == raised, err
    assert sum(line == err[0] for line in err) == 1 and 'raise RuntimeError("the licence' in "\n".join(err)
    assert err[-1] == f"fastrl train: error: {env} could not be made: it raised {raised}" + (
        " (in the evaluation process)" if where == "sync, evaluation" else "")
    assert multiprocessing.active_children() == []
    if where == "sync, evaluation":  # the run trained until its first evaluation
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["error"].rstrip().endswith(raised) and summary["env_steps"] >= 200


@pytest.mark.parametrize("where", ["grouped workers", "plain AsyncVectorEnv", "sync"])
@pytest.mark.parametrize("when", ["making", "stepping"])
@pytest.mark.parametrize("error", ["coded", "local"])
def test_an_env_error_that_cannot_cross_a_pipe_as_itself_is_reported_by_its_name_and_message(
        error, when, where, tmp_path, capsys):
    # Pickled, SimulatorError(7, "the solver diverged") keeps only its message, and does not
    # unpickle (a TypeError in the trainer); a class made in a function does not pickle at
    # all (the worker drops the error, and the trainer waits for it forever).
    from fastrl.cli import main
    args = failing_env_run("fastrl-test/SimulatorFailing-v0", tmp_path, "--env-kwargs", f"when={when}",
                           f"error={error}", "--total-steps", "400", "--eval-interval", "200",
                           *COLLECTIONS.get(where, []))
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    raised = "code 3: no licence" if when == "making" else "code 7: the solver diverged"
    name = "SimulatorError" if error == "coded" else "LocalError"
    qualified = "scripted_envs.SimulatorError" if error == "coded" else "scripted_envs._error_class.<locals>.LocalError"
    assert err[-2] == f"{qualified}: {raised}"  # the env's traceback, then one line
    what = "fastrl-test/SimulatorFailing-v0 could not be made: it raised" if when == "making" else "an env raised"
    assert err[-1] == f"fastrl train: error: {what} {name}: {raised}" + (
        " (in the evaluation process)" if when == "making" and where == "sync" else "")
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("backend", ["async", "sync"])
@pytest.mark.parametrize("wrong, said", [
    ("old reset", "reset() returned a value of type ndarray, not (obs, info) as gymnasium's API (since gym 0.26) "
                  "has it (the old gym API's, which this env follows)"),
    ("obs shape", "reset() returned an observation of shape (4,), and its observation_space has shape (3,)"),
    ("scalar obs", "reset() returned an observation of shape (), and its observation_space has shape (3,)"),
    ("reward", "step() returned a reward of array([ 1., -1.]), which is not a single number")])
def test_an_env_output_that_does_not_fit_gymnasiums_api_is_one_line_saying_what(wrong, said, backend, tmp_path,
                                                                                  capsys):
    # Not numpy's "could not broadcast..." nor a row filled with a scalar without a word.
    from fastrl.cli import main
    args = ["train", "--env", "fastrl-test/WrongOutput-v0", "--env-kwargs", f"wrong={wrong}", "--backend", backend,
            "--learner", "eager", "--num-envs", "4", "--total-steps", "400", "--no-progress",
            "--run-dir", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == f"fastrl train: error: fastrl-test/WrongOutput-v0's {said}\n"  # no traceback: none is the env's
    assert multiprocessing.active_children() == []


def test_an_env_whose_close_raises_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    # Every backend closes its envs when a run ends: found then, the error would cost the
    # run's summary and last checkpoint. Found when the env is checked, it costs nothing.
    from fastrl.cli import main
    args = ["train", "--env", "fastrl-test/SimulatorFailing-v0", "--env-kwargs", "when=closing", "--no-progress",
            "--run-dir", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == ["scripted_envs.SimulatorError: code 5: no handle to free",
                        "fastrl train: error: fastrl-test/SimulatorFailing-v0 could not be closed: it raised "
                        "SimulatorError: code 5: no handle to free"]
    assert not (tmp_path / "run").exists() and multiprocessing.active_children() == []


NOT_CLOSED = ("fastrl: warning: fastrl-test/SimulatorFailing-v0 could not be closed: it raised LocalError: "
              "code 5: no handle to free")


@pytest.mark.parametrize("where", ["grouped workers", "plain AsyncVectorEnv", "sync"])
def test_an_env_whose_close_raises_after_use_is_a_warning_and_the_run_is_saved(where, tmp_path, capfd):
    # A close() that passes the check at start can still fail once the env has stepped (a
    # renderer or a solver made at the first step). The run's work is done by then: it is
    # saved, and the error is a warning with the env's traceback, once for the training
    # envs (however many workers had one) and once for the evaluation process's.
    from fastrl.cli import main
    args = failing_env_run("fastrl-test/SimulatorFailing-v0", tmp_path, "--env-kwargs", "when=closing after use",
                           "error=local", "--total-steps", "400", "--eval-interval", "200", *COLLECTIONS.get(where, []))
    assert main(args) == 0
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("fastrl")] == [
        NOT_CLOSED, f"{NOT_CLOSED} (in the evaluation process)"]
    assert err.count('raise _error_class(self.error)(5, "no handle to free")') == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["error"] is None and summary["env_steps"] == 400 and summary["final_eval_episodes"] == 4
    assert torch.load(tmp_path / "checkpoint.pt")["meta"]["env_steps"] == 400
    assert multiprocessing.active_children() == []

    # `fastrl eval` of the checkpoint: its result, then the warning.
    assert main(["eval", str(tmp_path), "--episodes", "4", "--envs", "2", "--no-progress"]) == 0
    out, err = capfd.readouterr()
    assert out.endswith(" over 4 episodes\n") and err.splitlines()[-1] == NOT_CLOSED


@pytest.mark.parametrize("where", ["grouped workers", "plain AsyncVectorEnv", "sync"])
def test_an_env_error_is_still_the_error_when_its_close_raises_too(where, tmp_path, capfd):
    # Every env fails its step, then its close(): the step's error ends the run, the
    # close()'s is the warning (the workers report both through one queue).
    from fastrl.cli import main
    args = failing_env_run("fastrl-test/SimulatorFailing-v0", tmp_path, "--env-kwargs",
                           "when=stepping+closing after use", "error=local", "--total-steps", "400",
                           *COLLECTIONS.get(where, []))
    assert main(args) == 1
    err = capfd.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("fastrl")] == [
        NOT_CLOSED, "fastrl train: error: an env raised LocalError: code 7: the solver diverged"]
    assert json.loads((tmp_path / "summary.json").read_text())["error"].rstrip().endswith("the solver diverged")
    assert multiprocessing.active_children() == []


def test_from_python_an_env_error_is_a_fastrl_env_error_raised_after_the_summary(tmp_path):
    import fastrl
    config = fastrl.make_config(env_id="fastrl-test/FailingStep-v0", learner="eager", num_envs=4, total_steps=5000,
                                learning_starts=40, eval_interval=0, progress=False, run_dir=str(tmp_path))
    with pytest.raises(fastrl.EnvError, match=r"^an env raised ValueError: step 31 failed on purpose$") as info:
        fastrl.train(config)
    assert 'raise ValueError("step %d failed on purpose" % self.steps)' in info.value.trace
    assert json.loads((tmp_path / "summary.json").read_text())["error"] == info.value.trace


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan's reaper may not reap it)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("workers", ["grouped", "plain"])
def test_a_killed_trainer_leaves_no_worker_behind(tmp_path, workers):
    # SIGKILL (the OOM killer, `kill -9`) gives the trainer no chance to close anything;
    # its env workers and evaluation process must not wait for it forever.
    num_workers = "4" if workers == "plain" else "1"  # 4 envs
    with training_process(tmp_path, "--total-steps", "10000000", "--eval-interval", "0",
                          "--num-workers", num_workers) as proc:
        time.sleep(1.0)  # training
        pids = children(proc)
        assert len(pids) == (5 if workers == "plain" else 2)  # env workers, then the evaluation process
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while any(running(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert [pid for pid in pids if running(pid)] == []


