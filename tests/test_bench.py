"""`fastrl bench`: the table, bench.json and collect.png from a short real run."""
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
from test_cli import call_main, run_cli


def at_most_two_cores():
    # The bench gives every core a worker: on more cores, 4 envs would get plain
    # AsyncVectorEnv only. Two, as on CI, wherever the test runs.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])


@pytest.mark.slow
def test_bench_all_prints_tables_and_writes_json_and_png(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", "all", "--env", "CartPole-v1", "--num-envs", "2", "4", "--batch-sizes", "32",
                   "--modes", "eager", "--seconds", "0.2", "--rounds", "2", "--out", str(out),
                   preexec_fn=at_most_two_cores)
    assert proc.returncode == 0, proc.stderr
    assert "x limit" in proc.stdout and "updates/s" in proc.stdout and "single process" in proc.stdout
    for table in ("| backend ", "| mode "):  # each printed table lines up: header, rule and rows alike
        rows = proc.stdout.split(table, 1)[1].split("\n\n")[0].splitlines()
        assert len(rows) >= 3 and len({len(table + rows[0])} | {len(r) for r in rows[1:]}) == 1, rows

    result = json.loads((out / "bench.json").read_text())
    collect = result["collect"]
    assert collect["cores"] >= 1 and collect["single_process_steps_per_s"] > 1000
    assert collect["limit_steps_per_s"] == pytest.approx(collect["cores"] * collect["single_process_steps_per_s"])
    series = {(r["series"], r["num_envs"]) for r in collect["rows"]}
    for n in (2, 4):
        assert ("async, plain (1 env/process)", n) in series and ("sync", n) in series
        assert ("sync, plain SyncVectorEnv", n) in series
    assert ("async, grouped", 4) in series
    assert (("async, grouped, ready-first", 4) in series) == (collect["cores"] > 1)  # one group per worker
    singles, rows = collect["single_measurements"], collect["rows"]
    assert len(singles) == 2 * (len(rows) + 1)  # before the first case and after each, per round
    assert collect["single_process_steps_per_s"] == statistics.median(singles)
    for i, row in enumerate(rows):
        assert len(row["rounds"]) == 2 and row["steps_per_s"] == statistics.median(row["rounds"]) > 0
        # Each round's limit: the single process measured right before and right after the case.
        around = [(singles[r * (len(rows) + 1) + i] + singles[r * (len(rows) + 1) + i + 1]) / 2 for r in range(2)]
        assert row["limits"] == pytest.approx([collect["cores"] * one for one in around])
        ratios = [s / limit for s, limit in zip(row["rounds"], row["limits"])]
        assert row["ratio_to_limit"] == pytest.approx(statistics.median(ratios))
        assert row["ratio_range"] == pytest.approx([min(ratios), max(ratios)])
        low, high = row["ratio_range"]
        assert f"| {row['ratio_to_limit']:7.2f} | {low:.2f}–{high:.2f} |" in proc.stdout
    # Best of each by ratio to the limit around it: steps/s measured minutes apart compare the machine too.
    best = {kind: max((r for r in rows if r["series"].startswith(kind)), key=lambda r: r["ratio_to_limit"])
            for kind in ("async, grouped", "async, plain")}
    assert collect["best_grouped"]["num_envs"] == best["async, grouped"]["num_envs"]
    assert collect["grouped_over_plain"] == pytest.approx(
        best["async, grouped"]["ratio_to_limit"] / best["async, plain"]["ratio_to_limit"])
    assert f"{collect['grouped_over_plain']:.1f} x the best plain AsyncVectorEnv" in proc.stdout

    (learn,) = result["learn"]["rows"]
    assert learn["mode"] == "eager" and learn["batch_size"] == 32 and learn["updates_per_s"] > 10
    assert learn["samples_per_s"] == pytest.approx(32 * learn["updates_per_s"])

    png = (out / "collect.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.slow
def test_the_limit_counts_a_fractional_cpu_quota(monkeypatch):
    # docker --cpus=1.5 on 2 cores grants one and a half cores' time: 2 worker processes,
    # and a limit of 1.5 x the single process, not 2 x.
    import torch

    from fastrl.bench import bench_collect, format_collect
    cores = sorted(os.sched_getaffinity(0))[:2]  # real ones: the workers pin to them
    quota = len(cores) - 0.5
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cores))
    monkeypatch.setattr("fastrl.system.cgroup_cpu_quota", lambda: quota)
    result = bench_collect("CartPole-v1", [4], 0.1, 1, torch.device("cpu"))
    assert result["cores"] == quota
    assert result["limit_steps_per_s"] == pytest.approx(quota * result["single_process_steps_per_s"])
    assert {r["num_workers"] for r in result["rows"] if r["series"] == "async, grouped"} == {len(cores)}
    assert f" x {quota:g} cores = limit " in format_collect(result)


@pytest.mark.slow
def test_a_bench_all_interrupted_while_learning_keeps_the_collect_results(tmp_path, monkeypatch, capsys):
    import fastrl.bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the learn part

    monkeypatch.setattr(fastrl.bench, "bench_learn", interrupted)
    out = tmp_path / "bench"
    assert call_main(["bench", "all", "--env", "CartPole-v1", "--num-envs", "2", "--seconds", "0.1",
                      "--rounds", "1", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip() == "fastrl bench: interrupted"
    result = json.loads((out / "bench.json").read_text())
    assert "learn" not in result and result["collect"]["rows"]
    assert all(row["steps_per_s"] > 0 for row in result["collect"]["rows"])
    assert (out / "collect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,named", [
    (["collect", "--num-envs", "0"], "--num-envs=0"),
    (["learn", "--modes", "jit"], "'jit'"),
    (["learn", "--batch-sizes", "-4"], "--batch-sizes=-4"),
    (["collect", "--env", "Pendulum-v1"], "Pendulum-v1"),
    (["collect", "--seconds", "0"], "--seconds=0"),
    (["learn", "--seconds", "nan"], "--seconds=nan"),  # a measurement that would never end
    (["learn", "--seconds", "inf"], "--seconds=inf"),
    (["learn", "--threads", "99999"], "--threads=99999"),  # torch would try to start them all, and crash
])
def test_bench_bad_input_is_one_line_exit_2(args, named, capsys, tmp_path):
    assert call_main(["bench", *args, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_ctrl_c_during_a_bench_is_one_line_exit_130_and_leaves_no_process(tmp_path):
    cmd = [sys.executable, "-m", "fastrl", "bench", "collect", "--env", "CartPole-v1", "--num-envs", "4",
           "--seconds", "30", "--rounds", "1", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("fastrl bench collect:")  # measuring from here on
        time.sleep(2.0)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        _, err = proc.communicate(timeout=60)
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):  # no env worker is left behind
            os.killpg(proc.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 130 and err.strip() == "fastrl bench: interrupted", err
