"""`fastrl sweep` on this machine: the grid, trials in parallel, the results table against
the run dirs' own summaries, a killed trial resumed from its checkpoint, a killed sweep
resumed. (On a Ray cluster: tests/test_ray.py.)"""
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastrl import sweep
from fastrl.config import busy_cores
from fastrl.errors import ConfigError

RAY_MISSING = importlib.util.find_spec("ray") is None
# Short CartPole trials: in-process envs (one core each), eager learner (no compile).
QUICK = ["--env", "CartPole-v1", "--backend", "sync", "--learner", "eager", "--total-steps", "3000",
         "--learning-starts", "500", "--eval-interval", "0", "--eval-episodes", "5", "--eval-envs", "5"]


def fastrl(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "fastrl", *args], capture_output=True, text=True, timeout=timeout,
                          **kw)


def test_seeds_and_grids_parse_as_written():
    assert sweep.parse_seeds("0-3") == [0, 1, 2, 3]
    assert sweep.parse_seeds("1,5,9") == [1, 5, 9]
    assert sweep.parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("", "a-b", "3,3", "-1"):
        with pytest.raises(ConfigError, match="invalid --seeds"):
            sweep.parse_seeds(bad)
    grid = sweep.parse_grid(["lr=5e-4,1e-3", "hidden=64 64,128 128", "dueling=true,false"])
    assert grid == {"lr": ["5e-4", "1e-3"], "hidden": ["64 64", "128 128"], "dueling": ["true", "false"]}
    assert sweep.setting_args({"lr": "1e-3", "hidden": "64 64", "dueling": "false"}) == [
        "--lr", "1e-3", "--hidden", "64", "64", "--no-dueling"]
    for bad, why in (("lr", "NAME=V1,V2"), ("seed=1,2", "set by the sweep"), ("speed=1", "not a train option")):
        with pytest.raises(ConfigError, match=why):
            sweep.parse_grid([bad])
    with pytest.raises(ConfigError, match="already set"):
        sweep.parse_grid(["lr=1", "lr=2"])


def test_the_trials_at_once_fit_the_cores():
    from fastrl.config import make_config

    assert busy_cores(make_config(env_id="CartPole-v1", backend="sync")) == 1
    assert busy_cores(make_config(env_id="CartPole-v1", num_envs=8, num_workers=4)) == 5
    assert busy_cores(make_config(env_id="CartPole-v1", num_envs=8, num_workers=4, threads=2)) == 6
    # EnvPool's threads, one per env up to the cores
    assert busy_cores(make_config(env_id="CartPole-v1", num_envs=1, backend="envpool")) == 2


def check_results(out: Path, settings: list[str], seeds: list[int]) -> dict:
    """The results files against the run dirs' own summaries, per trial and per setting."""
    results = json.loads((out / "results.json").read_text())
    assert [(r["setting"], r["seed"]) for r in results["trials"]] == [(s, k) for s in settings for k in seeds]
    for row in results["trials"]:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert row["status"] == "finished" and summary["error"] is None and not summary["interrupted"]
        for key in ("solved", "solve_wall_s", "solve_env_steps", "final_eval_mean", "env_steps"):
            assert row[key] == summary[key], key
        assert json.loads((Path(row["run_dir"]) / "config.json").read_text())["seed"] == row["seed"]
    for s in results["settings"]:
        rows = [r for r in results["trials"] if r["setting"] == s["setting"]]
        finals = [r["final_eval_mean"] for r in rows]
        assert s["trials"] == len(seeds) and s["solved"] == sum(bool(r["solved"]) for r in rows)
        assert s["final_eval_mean"] == {"median": statistics.median(finals), "min": min(finals), "max": max(finals)}
    text = (out / "results.txt").read_text()
    assert all(name in text for name in settings)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return results


@pytest.mark.slow
def test_a_local_sweep_runs_the_grid_in_parallel_and_tables_it(tmp_path):
    out = tmp_path / "sweep"
    proc = fastrl("sweep", "--seeds", "0-2", "--set", "lr=5e-4,1e-3", "--out", str(out), "--parallel", "2", *QUICK)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    results = check_results(out, ["lr=5e-4", "lr=1e-3"], [0, 1, 2])
    configs = [json.loads((Path(r["run_dir"]) / "config.json").read_text()) for r in results["trials"]]
    assert [c["lr"] for c in configs] == [5e-4] * 3 + [1e-3] * 3
    assert not any(c["pin_workers"] for c in configs)  # trials sharing the machine pin no worker
    assert "2 at a time" in proc.stdout and "| lr=1e-3 |" in proc.stdout


def pid_of_trial(run_dir: Path) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"train" in cmdline and str(run_dir).encode() in cmdline:
                return int(entry.name)
    return None


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_killed_trial_is_retried_from_its_checkpoint_and_finishes(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fastrl", "sweep", "--seeds", "3", "--out", str(out), *QUICK,
           "--total-steps", "8000", "--checkpoint-interval", "1000steps"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = out / "default" / "seed3"
    wait_for(lambda: (run_dir / "state.pt").exists(), 120, "the trial's first saved state")
    os.kill(wait_for(lambda: pid_of_trial(run_dir), 10, "the trial's process"), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr + stdout
    assert "ended (exit code -9); retrying from its last saved state" in stdout
    results = check_results(out, ["default"], [3])
    row = results["trials"][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert row["processes"] == 2 and summary["resumes"] == 1 and summary["env_steps"] >= 8000


@pytest.mark.slow
def test_a_killed_sweep_resumes_keeping_its_finished_trials(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fastrl", "sweep", "--seeds", "0-2", "--out", str(out), "--parallel", "1", *QUICK,
           "--checkpoint-interval", "1000steps"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "default" / "seed1" / "state.pt").exists(), 180, "the second trial's saved state")
    proc.kill()  # the sweep, at once: its running trial dies with it
    proc.communicate()
    first = json.loads((out / "default" / "seed0" / "summary.json").read_text())
    wait_for(lambda: pid_of_trial(out / "default" / "seed1") is None, 10, "the orphaned trial to end")
    resumed = fastrl("sweep", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "1 of 3 trials already finished" in resumed.stdout
    results = check_results(out, ["default"], [0, 1, 2])
    assert json.loads((out / "default" / "seed0" / "summary.json").read_text()) == first  # not run again
    assert [r["processes"] for r in results["trials"]] == [1, 2, 1]
    assert json.loads((out / "default" / "seed1" / "summary.json").read_text())["resumes"] == 1


def test_a_sweep_refuses_bad_input_in_one_line(tmp_path):
    for args, message in (
            (["--set", "lr=abc"], "argument --lr: invalid float value: 'abc'"),
            (["--set", "lr=-1"], "invalid lr=-1.0"),
            (["--seed", "3"], "invalid --seed for a sweep: use --seeds"),
            (["--seeds", "x"], "invalid --seeds='x'"),
            # Without the ray extra (the README's test command installs none), that comes first.
            (["--ray", "127.0.0.1:9"], "Ray is not installed: pip install 'fastrl[ray]'" if RAY_MISSING
             else "cannot reach the Ray cluster at 127.0.0.1:9")):
        proc = fastrl("sweep", "--out", str(tmp_path / "s"), *args, "--env", "CartPole-v1", timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
    proc = fastrl("sweep", "--resume", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "holds no sweep" in proc.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    proc = fastrl("sweep", "--out", str(tmp_path / "full"), "--env", "CartPole-v1", timeout=60)
    assert proc.returncode == 2 and "is not empty" in proc.stderr


@pytest.mark.slow
def test_a_long_trial_shows_the_sweep_alive_with_a_progress_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "PROGRESS_S", 0.5)
    from fastrl.config import make_config

    config = make_config(env_id="CartPole-v1", backend="sync")
    plan = sweep.plan_sweep(tmp_path / "s", QUICK, config, {}, [0], 1, None, 0.0, 0)
    lines = []
    results = sweep.run_sweep(tmp_path / "s", plan, say=lines.append)
    assert any(line.endswith("1 running, 0 of 1 finished, 0 waiting") for line in lines), lines
    assert results["trials"][0]["status"] == "finished"
