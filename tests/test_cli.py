"""CLI smoke runs, the TensorBoard event file, checkpoints and bad input."""
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fastrl
from fastrl import checkpoint, system, timing
from fastrl.cli import build_parser, config_from_args, main
from fastrl.envs import inspect_env
from fastrl.errors import ConfigError
from fastrl.run.logs import Writer
from fastrl.training import check_storage_fits, replay_ring, rollout_buffer

TINY = ["--env", "CartPole-v1", "--total-steps", "1200", "--learning-starts", "400", "--num-envs", "4",
        "--eval-episodes", "4", "--eval-envs", "2", "--eval-interval", "600", "--learner", "eager",
        "--log-interval", "0.05", "--buffer-size", "2000", "--batch-size", "32"]


def call_main(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors exit
        return exc.code


def run_cli(*args, timeout=240, **popen):
    return subprocess.run([sys.executable, "-m", "fastrl", *args], capture_output=True, text=True,
                          timeout=timeout, **popen)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "cartpole"
    proc = run_cli("train", *TINY, "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc


@pytest.mark.slow
def test_train_writes_summary_checkpoint_and_progress(tiny_run):
    run_dir, proc = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("solved", "solve_wall_s", "solve_env_steps", "final_eval_mean", "final_eval_std",
                "env_steps", "updates", "wall_s", "checkpoint"):
        assert key in summary
    assert summary["env_steps"] >= 1200 and summary["updates"] > 0
    assert summary["final_eval_episodes"] == 4
    assert os.path.isfile(summary["checkpoint"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["env_id"] == "CartPole-v1" and config["batch_size"] == 32
    # What the automatic settings became here, and why, beside the settings.
    chosen = config["chosen"]
    assert chosen["device"] == {"value": "cpu" if not torch.cuda.is_available() else "cuda",
                                "why": "auto: cuda where a CUDA device is available, else cpu"}
    assert chosen["learner"] == {"value": "eager", "why": "set"}
    assert chosen["preset"]["for"] == "ddqn on CartPole-v1"
    assert "batch_size" not in chosen["preset"]["settings_kept"] and "tau" in chosen["preset"]["settings_kept"]
    assert chosen["machine"]["cpu_cores"] == system.cpu_capacity()
    assert "steps" in proc.stdout and "final eval" in proc.stdout and "run dir" in proc.stdout
    # What runs and where its curves go come first, for TensorBoard to watch from the start.
    first, second = proc.stdout.splitlines()[:2]
    assert first.startswith("ddqn on CartPole-v1, seed 0: 4 envs (async backend), eager learner on ")
    assert second == f"run dir: {run_dir}  (tensorboard --logdir {run_dir.parent})"


def test_the_automatic_settings_are_explained():
    from fastrl.config import choices

    chosen = choices(fastrl.make_config(num_envs=16), "cpu")  # the LunarLander preset, learner auto
    assert chosen["learner"] == {"value": "compile", "why": "auto: cudagraphs on CUDA (one launch per update), "
                                                              "else compile"}
    assert choices(fastrl.make_config(num_envs=16), "cuda", "H100")["learner"]["value"] == "cudagraphs"
    workers = system.default_workers(16)
    assert chosen["num_workers"]["value"] == workers and chosen["num_workers"]["why"].startswith("0: the largest")
    assert choices(fastrl.make_config(num_envs=16, num_workers=4), "cpu")["num_workers"] == {"value": 4,
                                                                                             "why": "set"}
    assert "num_workers" not in choices(fastrl.make_config(backend="sync"), "cpu")  # no worker processes
    kept = choices(fastrl.make_config(lr=1e-3), "cpu")["preset"]["settings_kept"]
    assert "lr" not in kept and "num_envs" in kept and "hidden" in kept
    assert choices(fastrl.make_config(env_id="Acrobot-v1"), "cpu")["preset"]["for"] is None


def test_a_presets_replay_ratio_grows_with_the_envs_the_caller_sets_and_a_set_ratio_stays():
    from fastrl.config import PRESETS, choices

    preset = PRESETS[("ddqn", "LunarLander-v3")]
    ratio, envs = preset["replay_ratio"], preset["num_envs"]
    assert fastrl.make_config().replay_ratio == ratio
    assert fastrl.make_config(num_envs=envs * 8).replay_ratio == pytest.approx(2 * ratio)  # 8 ** (1/3)
    assert fastrl.make_config(num_envs=np.int64(envs * 8)).replay_ratio == pytest.approx(2 * ratio)
    assert fastrl.make_config(num_envs=envs // 2).replay_ratio == ratio  # never fewer updates per env step
    assert fastrl.make_config(num_envs=envs * 8, replay_ratio=0.5).replay_ratio == 0.5
    assert choices(fastrl.make_config(num_envs=envs * 8), "cpu")["replay_ratio"]["why"].startswith(
        f"the preset's {ratio} (tuned at {envs} envs) times (num_envs / {envs}) ** (1/3)")
    assert choices(fastrl.make_config(), "cpu")["replay_ratio"] == {"value": ratio, "why": "the preset's"}
    assert choices(fastrl.make_config(replay_ratio=0.5), "cpu")["replay_ratio"] == {"value": 0.5, "why": "set"}
    assert "replay_ratio" not in choices(fastrl.make_config(env_id="Acrobot-v1"), "cpu")  # no preset: the default
    with pytest.raises(ConfigError, match="num_envs=0"):
        fastrl.make_config(num_envs=0)


def test_a_variant_of_an_env_gets_its_presets_variant_and_options_still_win():
    from fastrl.config import VARIANTS, choices

    calm, windy = fastrl.make_config(), fastrl.make_config(env_kwargs={"enable_wind": True, "wind_power": 15})
    wind = VARIANTS[("ddqn", "LunarLander-v3")]["enable_wind"]
    assert all(getattr(windy, k) == v for k, v in wind.items()) and any(getattr(calm, k) != v for k, v in wind.items())
    assert windy.lr == calm.lr and windy.hidden == calm.hidden  # the rest of the env's preset
    assert fastrl.make_config(env_kwargs={"enable_wind": False}).to_dict() == {**calm.to_dict(),
                                                                              "env_kwargs": {"enable_wind": False}}
    assert fastrl.make_config(env_kwargs={"enable_wind": True}, total_steps=7).total_steps == 7
    assert choices(windy, "cpu")["preset"]["for"] == "ddqn on LunarLander-v3, enable_wind"
    out = subprocess.run([sys.executable, "-m", "fastrl", "train", "--help"], capture_output=True, text=True).stdout
    listed = ", ".join(f"{k}={v}" for k, v in wind.items())
    assert f"with --env-kwargs enable_wind=true, also: {listed}" in out


@pytest.mark.slow
def test_no_progress_hides_only_the_live_line(tmp_path, capsys):
    assert call_main(["train", *TINY, "--no-progress", "--run-dir", str(tmp_path / "quiet")]) == 0
    out = capsys.readouterr().out
    assert "sps |" not in out  # the live progress line
    assert "eval @ 600 steps" in out and "final eval" in out and "run dir" in out


@pytest.mark.slow
def test_tensorboard_event_file_holds_the_scalars(tiny_run):
    run_dir, _ = tiny_run
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("charts/sps", "charts/updates_per_s", "charts/episodic_return", "charts/episodic_length",
                "losses/td_loss", "losses/q_mean", "charts/epsilon", "eval/return_mean"):
        assert tag in tags, tag
    eps = [e.value for e in acc.Scalars("charts/epsilon")]
    assert eps == sorted(eps, reverse=True) and eps[0] <= 1.0
    assert all(e.value > 0 for e in acc.Scalars("charts/sps"))
    assert "config/text_summary" in acc.Tags()["tensors"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ddqn", "reinforce"])
def test_a_run_shorter_than_the_log_interval_still_writes_its_curves(tmp_path, algo):
    # The loops write the last window when they end: here the only one.
    config = fastrl.make_config(env_id="CartPole-v1", algo=algo, total_steps=1200, learning_starts=400,
                                learner="eager", backend="sync", num_envs=4, eval_interval=0, eval_episodes=2,
                                eval_envs=2, log_interval=3600.0, progress=False, run_dir=str(tmp_path))
    summary = fastrl.train(config)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    loss = "losses/td_loss" if algo == "ddqn" else "losses/policy_loss"
    for tag in ("charts/sps", "charts/episodic_return", "charts/lr", loss, "time/env_s"):
        assert [e.step for e in acc.Scalars(tag)] == [summary["env_steps"]], tag


@pytest.mark.slow
def test_eval_command_prints_mean_and_std(tiny_run):
    run_dir, _ = tiny_run
    proc = run_cli("eval", str(run_dir / "checkpoint.pt"), "--episodes", "5", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    mean, _, rest = proc.stdout.strip().partition(" ± ")
    assert float(mean) > 0 and rest.endswith("over 5 episodes")
    assert proc.stderr == ""  # no progress line in a pipe or a log


def eval_on_a_terminal(*args) -> tuple[bytes, str]:
    """Runs `fastrl eval` with stderr on a pseudo-terminal: (what the terminal got, stdout)."""
    import pty
    master, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "fastrl", "eval", *args], stdout=subprocess.PIPE,
                            stderr=terminal, text=True)
    os.close(terminal)
    shown = b""
    try:
        while chunk := os.read(master, 4096):
            shown += chunk
    except OSError:  # EIO: the process has closed the terminal
        pass
    finally:
        os.close(master)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    return shown, out


@pytest.mark.slow
def test_eval_shows_a_live_progress_line_on_a_terminal(tiny_run):
    run_dir, _ = tiny_run
    shown, out = eval_on_a_terminal(str(run_dir), "--episodes", "40")
    assert b"40/40 episodes |" in shown and b"env steps/s" in shown and shown.startswith(b"\r[")
    assert out.strip().endswith("over 40 episodes") and len(out.strip().splitlines()) == 1
    shown, out = eval_on_a_terminal(str(run_dir), "--episodes", "40", "--no-progress")
    assert shown == b"" and out.strip().endswith("over 40 episodes")


@pytest.mark.slow
def test_help_documents_every_option_with_default():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for option in ("--env ", "--algo", "--num-envs", "--backend", "--device", "--n-step", "--replay-ratio",
                   "--tau", "--dueling", "--learner", "--num-workers", "--run-dir", "--env-kwargs", "--eval-episodes"):
        assert option in text, option
    assert text.count("(default:") >= 30


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[tuple[str, str]]:
    """(file, command) for every fastrl and benchmark-script command the READMEs and docs/ show: each
    line of a bash block, and each inline code span of three words or more (`fastrl bench`
    names a command in prose; `fastrl profile [options] --steps N` is a synopsis: skipped)."""
    found = []
    pages = ["README.md", os.path.join("benchmarks", "README.md")]
    pages += [os.path.join("docs", page) for page in sorted(os.listdir(os.path.join(REPO, "docs")))]
    for name in pages:
        with open(os.path.join(REPO, name)) as f:
            text = f.read()
        lines = [line.split("#")[0].split("&&")[-1] for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                 for line in block.splitlines()]
        spans = [span for span in re.findall(r"`((?:fastrl|python\s+benchmarks/)[^`]*)`", text)
                 if len(span.split()) >= 3 and not re.search(r"[\[|]", span)]
        found += [(name, " ".join(cmd.split())) for cmd in lines + spans
                  if cmd.split() and cmd.split()[0] in ("fastrl", "python")]
    return found


def test_every_command_in_the_readmes_is_accepted(capsys):
    """Each command a user may copy from the READMEs parses, and a train or profile command's
    values pass validation: a renamed option or a changed rule fails here, not for the user."""
    parser, failures = build_parser(), []
    commands = readme_commands()

    def check_fastrl(words: list[str]) -> None:
        if words[-1] != "--help":
            args = parser.parse_args(words[1:])
            if args.command in ("train", "profile"):
                config_from_args(args)

    for name, command in commands:
        words = shlex.split(command)
        try:
            if words[0] == "fastrl":
                check_fastrl(words)
            else:  # python benchmarks/<script>.py [its options] [-- fastrl train options, or a whole command]
                script, rest = words[1], words[2:]
                own, after = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
                with open(os.path.join(REPO, script)) as f:
                    source = f.read()
                unknown = [w for w in own if w.startswith("--") and f'"{w}"' not in source]
                assert not unknown, f"{script} has no option {unknown}"
                if after[:1] == ["fastrl"]:  # benchmarks/ray_local_cluster.py runs a command
                    check_fastrl(after)
                else:
                    config_from_args(parser.parse_args(["train", *after]))
        except (SystemExit, AssertionError, ConfigError, OSError) as exc:
            failures.append(f"{name}: {command}: {capsys.readouterr().err.strip() or exc}")
    assert len(commands) >= 40 and sum(c.startswith("python") for _, c in commands) >= 10  # the search finds them
    assert not failures, "\n".join(failures)


BAD = [
    (["--env", "NoSuchEnv-v9"], "NoSuchEnv-v9"),
    (["--batch-size", "512", "--buffer-size", "256"], "batch_size=512"),
    (["--gamma", "0"], "gamma=0"),
    (["--gamma", "1.5"], "gamma=1.5"),
    (["--n-step", "0"], "n_step=0"),
    (["--n-step", "20000", "--buffer-size", "100000", "--num-envs", "8"], "n_step=20000"),  # 12,500 per env
    (["--lr", "0"], "lr=0"),
    (["--lr=-1e-3"], "lr=-0.001"),
    (["--lr-end=-1e-4"], "lr_end=-0.0001"),  # the learning rate would turn negative
    (["--lr-end", "inf"], "lr_end=inf"),
    (["--replay-ratio", "inf"], "replay_ratio=inf"),  # a cycle that never ends its updates
    (["--algo", "reinforce", "--entropy-coef", "inf"], "entropy_coef=inf"),
    (["--algo", "reinforce", "--value-coef", "nan"], "value_coef=nan"),
    (["--num-envs", "0"], "num_envs=0"),
    (["--threads", "99999"], "threads=99999"),  # torch would try to start them all, and crash
    (["--device", "tpu"], "device='tpu'"),
    (["--algo", "ppo"], "algo='ppo'"),
    (["--backend", "threads"], "backend='threads'"),
    (["--learner", "jit"], "learner='jit'"),
    (["--num-workers", "3"], "num_workers=3"),
    (["--num-workers=-1"], "num_workers=-1"),
    (["--env", "LunarLander-v3", "--env-kwargs", "continuous=true"], "Discrete"),
    (["--env", "Pendulum-v1"], "Pendulum-v1"),
    (["--env-kwargs", "no_such_kwarg=1"], "no_such_kwarg"),
    (["--env-kwargs", "novalue"], "novalue"),
    (["--env-kwargs", "max_episode_steps=-5"], "max_episode_steps"),  # a ValueError in gymnasium
    (["--env-kwargs", "render_mode=human"], "fastrl eval RUN_DIR --render"),  # a window per env, at 50 fps
    (["--env-kwargs", "render_mode=bogus"], "render_mode='bogus' for LunarLander-v3: must be 'human' or 'rgb_array'"),
    (["--env", "LunarLander-v3", "--env-kwargs", "gravity=-20"], "gravity"),  # an assert in the env
    (["--num-envs", "many"], "many"),
    (["--total-steps", "2.5"], "'2.5'"),
    (["--collection", "eager"], "collection='eager'"),
    (["--collection", "ready-first", "--backend", "sync"], "backend='sync'"),
    (["--collection", "ready-first", "--env", "CartPole-v1", "--algo", "reinforce"], "algo=reinforce"),
    (["--collection", "ready-first", "--num-envs", "8", "--num-workers", "8"], "num_workers=num_envs=8"),
    (["--buffer-size", "1e12"], "buffer_size=1000000000000: a ring of 1,000,000,000,000 transitions"),  # 47 TB
    (["--algo", "reinforce", "--num-envs", "100000000"], "num_envs=100000000: a ring of 100000000 envs x 1,010"),
]


@pytest.mark.parametrize("args,named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(args, named, capsys, tmp_path):
    code = call_main(["train", *args, "--run-dir", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()  # stopped before any work


@pytest.mark.parametrize("command", ["train", "profile", "eval", "bench"])
def test_an_unknown_option_is_named_by_its_command_with_that_commands_help(command, capsys):
    positional = {"eval": ["RUN_DIR"], "bench": ["collect"]}.get(command, [])
    assert call_main([command, *positional, "--gama", "0.9", "--backends"]) == 2
    assert capsys.readouterr().err == (f"fastrl {command}: error: unrecognized arguments: --gama 0.9 --backends "
                                       f"(see fastrl {command} --help)\n")


@pytest.mark.parametrize("algo", ["ddqn", "reinforce"])
def test_a_ring_above_80_percent_of_the_available_memory_is_refused_before_any_work(algo, monkeypatch, tmp_path):
    train_module = importlib.import_module("fastrl.training")  # (fastrl.train is the function)
    config = fastrl.make_config(env_id="CartPole-v1", algo=algo, run_dir=str(tmp_path / "never"))
    spec, cpu = inspect_env("CartPole-v1", {}), torch.device("cpu")
    make = replay_ring if algo == "ddqn" else rollout_buffer
    ring = make(config, spec, cpu)
    need = sum(x.untyped_storage().nbytes() for x in ring.storage)
    if algo == "reinforce":
        need += ring.learned.nbytes + ring.log_probs.nbytes
    assert make(config, spec, torch.device("meta")).nbytes == need  # what the check counts is what is allocated
    monkeypatch.setattr(train_module, "available_memory", lambda: int(need / 0.79))
    check_storage_fits(config, spec, cpu)  # 79% of it: fits
    monkeypatch.setattr(train_module, "available_memory", lambda: int(need / 0.81))
    with pytest.raises(ConfigError, match=rf"may take at most 80% of the {need / 0.81 / 1e9:.1f} GB of memory"):
        fastrl.train(config)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("algo", ["ddqn", "reinforce"])
def test_a_network_that_cannot_fit_in_memory_is_one_line_before_any_process_starts(algo, capsys, tmp_path):
    # 10 G parameters: 40 GB a copy, where the ring would fit.
    code = call_main(["train", "--algo", algo, "--hidden", "100000", "100000", "--run-dir", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "invalid hidden=(100000, 100000): a network of 10,00" in err and "use smaller widths" in err
    assert not (tmp_path / "never").exists()


def test_ctrl_c_while_the_command_line_imports_torch_is_one_line_exit_130(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fastrl", "train", "--run-dir", str(tmp_path / "never")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the interpreter is up; torch takes seconds to import
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, "fastrl train: interrupted\n")
    assert not (tmp_path / "never").exists()


def test_the_python_api_given_the_wrong_kind_of_argument_says_what_it_wants():
    cases = [(fastrl.train, {}, "fastrl.train() takes a TrainConfig (from fastrl.make_config(**settings)), not dict"),
             (fastrl.train, None, "fastrl.train() needs a TrainConfig (from fastrl.make_config(**settings)) or "
                                  "resume=RUN_DIR"),
             (fastrl.load, None, "fastrl.load and fastrl.evaluate take a checkpoint's path (a checkpoint.pt or "
                                 "a run directory holding one), not NoneType"),
             (fastrl.evaluate, 3, "fastrl.load and fastrl.evaluate take a checkpoint's path (a checkpoint.pt or "
                                  "a run directory holding one), not int")]
    for function, argument, message in cases:
        with pytest.raises(TypeError) as raised:
            function(argument)
        assert str(raised.value) == message
    with pytest.raises(TypeError, match="resume=...\\) takes a run directory's path, not int"):
        fastrl.train(resume=3)


def test_ready_first_where_workers_would_step_one_env_each_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("fastrl.system.cpu_cores", lambda: 17)  # the preset's 16 envs: 16 workers by default
    code = call_main(["train", "--collection", "ready-first", "--run-dir", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "collection='ready-first' with one env per worker process" in err and "--num-workers" in err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_bad_input_exit_code_and_no_traceback_from_the_console_script(tmp_path):
    proc = run_cli("train", "--gamma", "2", "--run-dir", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fastrl train: error: invalid gamma=2.0: must be in (0, 1]"
    proc = run_cli("eval", str(tmp_path / "missing.pt"))
    assert proc.returncode == 2 and "missing.pt" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["train", *TINY, "--run-dir"], ["profile", *TINY, "--run-dir"],
                                     ["bench", "collect", "--num-envs", "2", "--seconds", "0.1", "--out"]],
                         ids=["train", "profile", "bench"])
def test_an_unwritable_output_directory_is_one_line_and_starts_no_process(command, capsys, tmp_path):
    (tmp_path / "a_file").write_text("")
    assert call_main([*command, str(tmp_path / "a_file" / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "a_file" in err and "cannot write there" in err
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_a_run_dir_that_holds_a_run_is_refused_and_left_as_it_was(tiny_run, capsys):
    run_dir, _ = tiny_run
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    assert call_main(["train", *TINY, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds a run already" in err and str(run_dir) in err
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("broken", [("fastrl.training", "Run"), ("fastrl.run.logs", "Writer")], ids=["run", "writer"])
def test_a_failure_setting_up_the_run_leaves_no_process(broken, monkeypatch, tmp_path):
    def fails(*args, **kwargs):
        raise RuntimeError("cannot set up the run")

    module, name = broken
    monkeypatch.setattr(importlib.import_module(module), name, fails)
    with pytest.raises(RuntimeError, match="cannot set up the run"):
        main(["train", *TINY, "--run-dir", str(tmp_path / "run")])
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_eval_takes_a_run_directory_and_rejects_bad_paths_and_devices(tiny_run, capsys, tmp_path):
    run_dir, _ = tiny_run
    assert call_main(["eval", str(run_dir / "checkpoint.pt"), "--episodes", "3", "--seed", "4"]) == 0
    from_file = capsys.readouterr().out
    assert call_main(["eval", str(run_dir), "--episodes", "3", "--seed", "4"]) == 0
    assert capsys.readouterr().out == from_file and "over 3 episodes" in from_file
    bad = [([str(tmp_path)], "is a directory without a checkpoint.pt"),
           ([str(run_dir), "--device", "tpu"], "--device='tpu'"),
           ([str(run_dir), "--seed", "-1"], "seed=-1"),  # eval env seeds would reach training's
           ([str(run_dir), "--seed", str(2**31)], f"seed={2**31}"),
           ([str(run_dir), "--episodes", "0"], "episodes=0"), ([str(run_dir), "--envs", "0"], "num_envs=0")]
    if not torch.cuda.is_available():
        bad.append(([str(run_dir), "--device", "cuda"], "device='cuda'"))
    for args, named in bad:
        assert call_main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and named in err and "Traceback" not in err, err
    # The same checks from Python, where a bad value used to fail deep in gymnasium or numpy.
    for kwargs, named in [(dict(episodes=0), "episodes=0"), (dict(episodes=2.5), "episodes=2.5"),
                          (dict(num_envs=0), "num_envs=0"), (dict(seed=-4_000_000_000), "seed=-4000000000")]:
        with pytest.raises(ConfigError, match=f"^invalid {re.escape(named)}: must be "):
            fastrl.evaluate(run_dir, **kwargs)


@pytest.mark.slow
def test_eval_refuses_a_checkpoint_of_weights_that_are_not_finite_in_one_line(tiny_run, capsys, tmp_path):
    # fastrl no longer saves them, but an older version did: argmax over nan would play one action.
    saved = checkpoint.load(str(tiny_run[0] / "checkpoint.pt"))
    saved["model"]["torso.0.bias"][3] = float("nan")
    checkpoint.save_payload(tmp_path / "diverged.pt", saved)  # whole: its checksum matches
    path = str(tmp_path / "diverged.pt")
    assert call_main(["eval", path]) == 2
    assert capsys.readouterr().err == (f"fastrl eval: error: checkpoint {path!r} holds weights that are not finite "
                                       f"(nan or inf): the run that saved it had diverged\n")


@pytest.mark.slow
def test_eval_render_plays_the_same_episodes_in_a_window_at_the_frame_rate(tiny_run, monkeypatch):
    run_dir, _ = tiny_run
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # pygame draws into memory: no display in CI
    plain = fastrl.evaluate(run_dir, episodes=2, num_envs=1, seed=5)
    start = time.perf_counter()
    watched = fastrl.evaluate(run_dir, episodes=2, seed=5, render=True)
    elapsed = time.perf_counter() - start
    assert watched.returns == plain.returns  # the same policy on the same env seeds
    # CartPole pays 1 per step, and draws each step at its render_fps (50): a window's pace.
    assert elapsed >= 0.9 * sum(watched.returns) / 50 > 0.2
    assert fastrl.evaluate(run_dir, render=True).episodes == 3  # a few episodes to watch by default


@pytest.mark.slow
def test_a_plain_eval_never_draws_though_the_run_was_trained_with_a_window(tiny_run, tmp_path, monkeypatch):
    # Training refuses render_mode='human' now; a checkpoint written before still holds it.
    run_dir, _ = tiny_run
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    _, model, _ = fastrl.load(str(run_dir))
    payload = checkpoint.load(run_dir)
    old = tmp_path / "checkpoint.pt"
    checkpoint.save(old, {**payload["config"], "env_kwargs": {"render_mode": "human"}}, model.state_dict(),
                    payload["meta"])
    assert fastrl.load(str(old))[0].env_kwargs == {"render_mode": "human"}
    drawn = []  # CartPole draws in step() when its render_mode is 'human'
    monkeypatch.setattr(CartPoleEnv, "render", lambda self: drawn.append(1))
    result = fastrl.evaluate(str(old), episodes=2, num_envs=1, seed=5)
    assert result.returns == fastrl.evaluate(run_dir, episodes=2, num_envs=1, seed=5).returns
    assert drawn == []


@pytest.mark.slow
def test_eval_refuses_in_one_line_no_display_an_env_without_a_window_or_an_unknown_env(tiny_run, tmp_path, capsys,
                                                                                  monkeypatch):
    run_dir, _ = tiny_run
    if sys.platform.startswith("linux"):  # elsewhere a desktop has no DISPLAY variable to check
        for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
            monkeypatch.delenv(name, raising=False)
        assert call_main(["eval", str(run_dir), "--render"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "render needs a display" in err, err
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    scripted = fastrl.train(fastrl.make_config(
        env_id="fastrl-test/Terminating-v0", total_steps=64, learning_starts=32, batch_size=8, num_envs=2,
        backend="sync", learner="eager", eval_interval=0, eval_episodes=2, progress=False,
        run_dir=str(tmp_path / "scripted")))
    assert call_main(["eval", scripted["checkpoint"], "--render"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastrl-test/Terminating-v0 cannot draw to a window" in err, err
    # Where the env is not registered (the test envs are registered only in this process): one line too.
    proc = run_cli("eval", scripted["checkpoint"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "invalid env_id='fastrl-test/Terminating-v0'" in proc.stderr


def test_cuda_request_without_cuda_is_a_clear_error(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert call_main(["train", "--device", "cuda", "--run-dir", str(tmp_path / "x")]) == 2
    assert "device='cuda'" in capsys.readouterr().err
    assert call_main(["train", "--learner", "cudagraphs", "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "learner='cudagraphs'" in err and "CUDA" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def train_here(run_dir: str) -> str:
    """Trains CartPole briefly in this process, as a sweep would; returns "trained" or the
    ConfigError's message."""
    config = fastrl.make_config(env_id="CartPole-v1", total_steps=1200, learning_starts=400, learner="eager",
                                eval_interval=0, eval_episodes=2, progress=False, run_dir=run_dir)
    try:
        fastrl.train(config)
    except ConfigError as exc:
        return str(exc)
    return "trained"


@pytest.mark.slow
def test_time_to_solve_is_start_up_plus_the_run_not_what_the_process_did_before(tmp_path):
    # A sweep's worker process or a notebook calls train() again and again: each run's time
    # to solve is its own plus the process's start-up, as for a fresh `fastrl train`.
    def run(name):
        config = fastrl.make_config(env_id="CartPole-v1", total_steps=400, learner="eager", backend="sync",
                                    num_envs=2, eval_interval=100, eval_episodes=1, eval_envs=1,
                                    solve_threshold=-1e9, progress=False, run_dir=str(tmp_path / name))
        t0 = time.perf_counter()
        summary = fastrl.train(config)
        return summary, time.perf_counter() - t0

    run("first")
    second, took = run("second")
    assert second["solved"]
    assert timing.startup_s() < second["solve_wall_s"] <= timing.startup_s() + took


@pytest.mark.slow
def test_train_leaves_the_callers_torch_thread_count_as_it_was(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # a notebook's own setting
    try:
        fastrl.train(fastrl.make_config(env_id="CartPole-v1", total_steps=200, threads=1, learner="eager",
                                        backend="sync", num_envs=2, eval_interval=0, eval_episodes=1, eval_envs=1,
                                        progress=False, run_dir=str(tmp_path)))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["multiprocessing.Pool", "ProcessPoolExecutor"])
def test_a_sweep_trains_in_a_process_pool_or_is_told_which_to_use(pool, tmp_path):
    # A multiprocessing.Pool worker is daemonic and may not start the env and evaluation
    # processes: one line that says what to use instead, before any work starts.
    run_dir = str(tmp_path / "run")
    if pool == "multiprocessing.Pool":
        with multiprocessing.get_context("fork").Pool(1) as workers:
            message = workers.apply(train_here, (run_dir,))
        assert "daemonic" in message and "ProcessPoolExecutor" in message and "\n" not in message, message
        assert not (tmp_path / "run").exists()
    else:  # 'spawn': a fork of a process that has used CUDA cannot use CUDA (test below)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as workers:
            assert workers.submit(train_here, run_dir).result() == "trained"
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["env_steps"] == 1200


def test_training_in_a_fork_of_a_process_that_used_cuda_is_a_one_line_error(monkeypatch, tmp_path):
    # CUDA refuses such a fork, and torch would fail deep inside with "CUDA error:
    # initialization error". The real thing on a CUDA machine; elsewhere, CUDA as torch sees it there.
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # this process uses CUDA: its forks cannot
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as workers:
        message = workers.submit(train_here, str(tmp_path / "run")).result()
    assert "device='auto'" in message and "forked" in message and "'spawn'" in message, message
    assert "\n" not in message and not (tmp_path / "run").exists()


def test_checkpoint_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"format": checkpoint.FORMAT, "payload": Exploit(str(marker))}, path)
    with pytest.raises(ValueError, match="not a loadable fastrl checkpoint"):
        checkpoint.load(path)
    assert not marker.exists()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def full_disk_after(monkeypatch, name: str, successes: int) -> None:
    """After `successes` writes of the run's file `name`, its writes fail as on a full disk:
    the temporary file it is written to is swapped for /dev/full (ENOSPC)."""
    real_fdopen, writes = os.fdopen, []

    def fdopen(fd, mode="r", *args, **kwargs):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):  # atomic_write's temporary
            writes.append(fd)
            if len(writes) > successes:
                os.close(fd)
                return open("/dev/full", mode)
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    checkpoint.save_json(path, {"v": 1})
    full_disk_after(monkeypatch, "summary.json", 0)
    full = rf"^cannot write {re.escape(str(path))}: No space left on device$"
    with pytest.raises(fastrl.WriteFailed, match=full):
        checkpoint.save_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left


@pytest.mark.slow
def test_a_full_disk_mid_run_stops_it_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    # TINY evaluates (and saves) at 600 and 1,200 env steps; the second save fails.
    full_disk_after(monkeypatch, "checkpoint.pt", 1)
    code = call_main(["train", *TINY, "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == f"fastrl train: error: cannot write {tmp_path / 'checkpoint.pt'}: No space left on device"
    assert multiprocessing.active_children() == []  # env workers and evaluation process closed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "No space left on device" in summary["error"] and not summary["interrupted"]
    assert summary["checkpoint"] == str(tmp_path / "checkpoint.pt")  # the earlier one, intact:
    assert checkpoint.load(summary["checkpoint"])["meta"]["env_steps"] == 600


@pytest.mark.slow
def test_a_full_disk_under_tensorboard_stops_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    real_init = Writer.__init__

    def init_then_fill_the_disk(self, run_dir, **kwargs):
        real_init(self, run_dir, **kwargs)
        self.flush()
        [events] = Path(run_dir).glob("events.out.tfevents.*")
        events.unlink()
        events.symlink_to("/dev/full")  # every later write of the event file: ENOSPC

    monkeypatch.setattr(Writer, "__init__", init_then_fill_the_disk)
    threads_hook = threading.excepthook
    code = call_main(["train", *TINY, "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    # Nothing else: tensorboard's writer thread prints no traceback of its own.
    assert err.strip() == f"fastrl train: error: cannot write TensorBoard events in {tmp_path}: No space left on device"
    assert threading.excepthook is threads_hook and multiprocessing.active_children() == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "TensorBoard events" in summary["error"] and Path(summary["checkpoint"]).exists()


def finite_checkpoint_steps(run_dir: Path) -> int:
    """The env steps of the run's checkpoint, whose weights must all be finite."""
    saved = checkpoint.load(str(run_dir / "checkpoint.pt"))
    assert all(torch.isfinite(w).all() for w in saved["model"].values())
    return saved["meta"]["env_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ddqn", "reinforce"])
@pytest.mark.parametrize("env, given", [("NanObs-v0", "observations"), ("InfReward-v0", "rewards")])
def test_an_env_giving_non_finite_values_stops_training_in_one_line_and_keeps_finite_weights(
        algo, env, given, tmp_path, capsys):
    # Each env's observations (nan) or rewards (inf) go bad after its 100th step, at about
    # 400 env steps in all; the evaluation envs take ~8 steps per evaluation, so they stay good.
    args = ["train", "--env", f"fastrl-test/{env}", "--algo", algo, "--learner", "eager", "--num-envs", "4",
            "--total-steps", "4000", "--learning-starts", "40", "--rollout-steps", "16", "--eval-interval", "200",
            "--eval-episodes", "4", "--eval-envs", "2", "--log-interval", "0.05", "--no-progress",
            "--run-dir", str(tmp_path)]
    assert call_main(args) == 1
    err = capsys.readouterr().err.strip()
    # Caught when a learner statistic is logged, or before the weights are evaluated and saved.
    found = re.fullmatch(rf"fastrl train: error: training diverged at ([\d,]+) env steps: (.+ is (nan|inf)|the "
                         rf"network's weights are no longer finite); the env gave non-finite {given} \(nan or inf, "
                         rf"still in the ring\): make the env's observations and rewards finite", err)
    assert found, err
    diverged_at = int(found[1].replace(",", ""))
    assert 400 < diverged_at < 4000 and multiprocessing.active_children() == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "training diverged" in summary["error"] and summary["env_steps"] == diverged_at
    assert summary["checkpoint"] == str(tmp_path / "checkpoint.pt")
    assert finite_checkpoint_steps(tmp_path) < diverged_at  # the last finite weights: never overwritten


def weights_blow_up_at_update(monkeypatch, n: int, after_it: bool = False, then: Callable[[], Any] = lambda: None):
    """At DDQN's n-th update, one weight becomes inf: before the update (its statistics are
    not finite) or `after_it` (they are); then `then()` is called."""
    from fastrl.algos import ddqn
    real_make_learn_step = ddqn.make_learn_step

    def make_learn_step(sample, q, *args, **kwargs):
        learn, updates = real_make_learn_step(sample, q, *args, **kwargs), []

        def learn_and_blow_up():
            updates.append(1)
            stats = learn() if after_it else None
            if len(updates) == n:
                with torch.no_grad():
                    next(q.parameters()).fill_(float("inf"))
                then()
            return stats if after_it else learn()

        return learn_and_blow_up

    monkeypatch.setattr(ddqn, "make_learn_step", make_learn_step)


@pytest.mark.slow
def test_a_learner_that_diverges_on_finite_data_stops_in_one_line_and_keeps_the_last_finite_checkpoint(
        tmp_path, monkeypatch, capsys):
    weights_blow_up_at_update(monkeypatch, 120)  # TINY: at ~640 env steps
    assert call_main(["train", *TINY, "--no-progress", "--run-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"fastrl train: error: training diverged at [\d,]+ env steps: .+; the env's observations "
                        r"and rewards in the ring are all finite, so the learner itself diverged: lower --lr", err), err
    assert finite_checkpoint_steps(tmp_path) == 600  # TINY's first evaluation; the second was refused
    assert json.loads((tmp_path / "summary.json").read_text())["final_eval_mean"] is not None  # at 600


@pytest.mark.slow
def test_weights_found_not_finite_at_the_checkpoint_of_a_stopped_run_still_leave_the_summary(
        tmp_path, monkeypatch, capsys):
    # The 120th update's statistics are finite, its weights are not, and a stop (Ctrl-C)
    # comes with it: no later update or evaluation sees them; the checkpoint on the way
    # out is the first check.
    weights_blow_up_at_update(monkeypatch, 120, after_it=True, then=lambda: os.kill(os.getpid(), signal.SIGINT))
    assert call_main(["train", *TINY, "--no-progress", "--run-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"fastrl train: error: training diverged at [\d,]+ env steps: the network's weights are no "
                        r"longer finite; .+ lower --lr", err), err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] and "the network's weights are no longer finite" in summary["error"]
    assert summary["checkpoint"] == str(tmp_path / "checkpoint.pt") and finite_checkpoint_steps(tmp_path) == 600


@pytest.mark.slow
def test_from_python_a_divergence_is_a_fastrl_diverged_raised_after_the_summary(tmp_path):
    config = fastrl.make_config(env_id="fastrl-test/NanObs-v0", learner="eager", num_envs=4, total_steps=4000,
                                learning_starts=40, eval_interval=0, log_interval=0.05, progress=False,
                                run_dir=str(tmp_path))
    with pytest.raises(fastrl.Diverged, match=r"^training diverged at .+ the env gave non-finite observations"):
        fastrl.train(config)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "fastrl.errors.Diverged: training diverged" in summary["error"] and summary["checkpoint"] is None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*The reward is an inf value")  # gymnasium's env checker: right
def test_an_env_giving_an_infinite_reward_in_an_evaluation_is_one_line(tmp_path, capsys):
    # No update ever: only the evaluation sees the rewards, and a mean of inf would "solve".
    run_dir = tmp_path / "run"
    args = ["train", "--env", "fastrl-test/InfReward-v0", "--env-kwargs", "after=0", "--learning-starts", "1e9",
            "--num-envs", "2", "--total-steps", "100", "--eval-episodes", "4", "--eval-envs", "2",
            "--solve-threshold", "1", "--no-progress", "--run-dir", str(run_dir)]
    assert call_main(args) == 1
    returned = "an env gave a non-finite reward: an evaluation episode returned inf; rewards must be finite numbers"
    assert capsys.readouterr().err.strip() == f"fastrl train: error: {returned} (in the evaluation process)"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not summary["solved"] and summary["final_eval_mean"] is None and returned in summary["error"]
    assert call_main(["eval", str(run_dir), "--episodes", "4"]) == 1  # the checkpoint's own evaluation too
    assert capsys.readouterr().err.strip() == f"fastrl eval: error: {returned}"


def test_python_api_values_become_plain_types_and_a_wrong_kind_is_a_one_line_error(tmp_path):

    # A sweep's numpy scalars, total_steps=1e6, a pathlib run_dir: plain Python values, so
    # config.json can be written.
    c = fastrl.make_config(env_id="CartPole-v1", num_envs=np.int64(4), lr=np.float32(1e-3), total_steps=1e6,
                           hidden=np.array([32, 32]), run_dir=tmp_path / "run")
    assert (c.num_envs, c.total_steps, c.hidden) == (4, 1_000_000, (32, 32)) and c.lr == pytest.approx(1e-3)
    assert c.run_dir == str(tmp_path / "run")
    assert [type(v) for v in (c.num_envs, c.lr, c.total_steps, c.hidden[0])] == [int, float, int, int]
    saved = json.dumps(c.to_dict())  # (nan != nan: compare the JSON)
    assert json.dumps(fastrl.TrainConfig.from_dict(json.loads(saved)).to_dict()) == saved
    for bad, named in [(dict(gamma="0.9"), "gamma='0.9'"), (dict(num_envs=2.5), "num_envs=2.5"),
                       (dict(hidden=64), "hidden=64"), (dict(dueling=1), "dueling=1"),
                       (dict(total_steps=float("inf")), "total_steps=inf"), (dict(env_kwargs="x"), "env_kwargs='x'")]:
        with pytest.raises(ConfigError, match=f"^invalid {re.escape(named)}: must be "):
            fastrl.make_config(**bad)


def test_integer_options_take_scientific_notation():  # in every command
    args = build_parser().parse_args(["train", "--total-steps", "1e6", "--buffer-size", "2.5e4",
                                      "--learning-starts", "1_000"])
    assert (args.total_steps, args.buffer_size, args.learning_starts) == (1_000_000, 25_000, 1_000)
    assert type(args.total_steps) is int
    assert build_parser().parse_args(["bench", "collect", "--num-envs", "1.28e2", "2.56e2"]).num_envs == [128, 256]
    assert build_parser().parse_args(["eval", "run", "--episodes", "1e3"]).episodes == 1000


def test_env_kwargs_parse_to_typed_values():
    from fastrl.cli import parse_env_kwargs
    assert parse_env_kwargs(["enable_wind=true", "wind_power=15", "turbulence_power=1.5", "name=x"]) == {
        "enable_wind": True, "wind_power": 15, "turbulence_power": 1.5, "name": "x"}


@pytest.mark.slow
def test_wall_clock_budget_stops_training(tmp_path):
    import time

    import fastrl
    config = fastrl.make_config(env_id="CartPole-v1", total_steps=10_000_000, time_limit_s=3.0, learner="eager",
                                backend="sync", eval_interval=0, eval_episodes=2, eval_envs=2, progress=False,
                                run_dir=str(tmp_path / "budget"))
    t0 = time.perf_counter()
    summary = fastrl.train(config)
    assert 3.0 <= summary["wall_s"] < 20 and time.perf_counter() - t0 < 30
    assert 0 < summary["env_steps"] < 10_000_000 and not summary["interrupted"]


@pytest.mark.slow
def test_an_env_registered_by_a_module_trains_and_evaluates_from_the_command_line(tmp_path):
    # gymnasium's "module:EnvId": the module that registers the env is imported first.
    (tmp_path / "my_envs.py").write_text(
        "import gymnasium as gym\n"
        "gym.register('MyCartPole-v0', entry_point='gymnasium.envs.classic_control:CartPoleEnv',"
        " max_episode_steps=50)\n")
    (tmp_path / "broken_envs.py").write_text("raise ImportError('needs a simulator this machine lacks')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run_dir = tmp_path / "run"
    args = [a if a != "CartPole-v1" else "my_envs:MyCartPole-v0" for a in TINY]
    proc = run_cli("train", *args, "--run-dir", str(run_dir), env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["env_id"] == "my_envs:MyCartPole-v0"
    proc = run_cli("eval", str(run_dir), "--episodes", "3", env=env)  # a fresh process imports it again
    assert proc.returncode == 0 and "over 3 episodes" in proc.stdout, proc.stderr

    for env_id, why in [("no_such_module:X-v0", "importing 'no_such_module' failed (ModuleNotFoundError"),
                        ("broken_envs:X-v0", "importing 'broken_envs' failed (ImportError: needs a simulator"),
                        ("my_envs:NotRegistered-v0", "invalid env_id='my_envs:NotRegistered-v0'")]:
        proc = run_cli("train", "--env", env_id, "--run-dir", str(tmp_path / "never"), env=env)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert why in proc.stderr


def test_the_default_run_dir_is_one_level_below_runs_whatever_the_env_id():
    from fastrl.run.artifacts import default_run_dir
    for env_id, name in [("CartPole-v1", "CartPole-v1"), ("my_envs:Maze-v0", "Maze-v0"),
                         ("fastrl-test/Terminating-v0", "fastrl-test-Terminating-v0"),
                         ("my_envs:ns/Maze-v0", "ns-Maze-v0")]:
        path = Path(default_run_dir(fastrl.make_config(env_id=env_id, seed=3)))
        assert path.parent == Path("runs") and re.fullmatch(rf"{re.escape(name)}__ddqn__3__\d{{8}}-\d{{6}}", path.name)
