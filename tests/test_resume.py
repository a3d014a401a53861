"""Resume: a stopped run goes on from its state.pt with every piece of its state as saved,
its curves continuing at the same step; and what resume relies on (checkpoints that prove
they are whole, one-line refusals)."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fastrl
from fastrl import checkpoint
from fastrl.buffer import ReplayRing, RolloutBuffer
from fastrl.errors import ConfigError
from fastrl.run import Run

SMALL = dict(env_id="CartPole-v1", hidden=(16,), learner="eager", num_envs=4, eval_episodes=10, eval_envs=5,
             progress=False, stop_on_solve=False, log_interval=0.1)
SETTINGS = {
    "ddqn": dict(SMALL, total_steps=3000, eval_interval=1000, learning_starts=500, buffer_size=2000,
                 checkpoint_interval="700steps"),
    "reinforce": dict(SMALL, algo="reinforce", total_steps=3000, eval_interval=1000, rollout_steps=32,
                      checkpoint_interval="700steps"),
}


def state_of(run_dir: Path) -> dict:
    return checkpoint.load_payload(run_dir / "state.pt", checkpoint.STATE_FORMAT, "state")


def assert_same(a, b, where: str = "") -> None:
    """Equal, tensors exactly, recursively; `where` names the piece that differs."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ddqn", "reinforce"])
def test_a_resumed_run_restores_every_piece_of_the_saved_state(tmp_path, monkeypatch, algo):
    # A run ends its budget with an evaluation in flight; resumed with a larger budget but
    # stopped before its first step, it saves again: every piece as it was saved, but the
    # ring, which the cut changed in the one way it should.
    run_dir = tmp_path / "run"
    fastrl.train(fastrl.make_config(**SETTINGS[algo], run_dir=run_dir))
    saved = state_of(run_dir)
    assert saved["evals"]["evaluating"] is not None  # submitted at the last step: in flight when saved
    monkeypatch.setattr(Run, "budget_left", lambda self: False)
    summary = fastrl.train(fastrl.make_config(**{**SETTINGS[algo], "total_steps": 4000}, run_dir=run_dir),
                           resume=run_dir)
    again = state_of(run_dir)
    assert summary["resumes"] == 1 and again["resumes"] == 1 and saved["resumes"] == 0
    assert again["wall_s"] >= saved["wall_s"]
    storage = "ring" if algo == "ddqn" else "buffer"
    for piece in ["env_steps", "updates", "episodes", "recent_returns", "evals", "rng"]:
        assert_same(saved[piece], again[piece], piece)
    for piece in saved["loop"]:
        if piece != storage:
            assert_same(saved["loop"][piece], again["loop"][piece], piece)
    assert again["config"]["total_steps"] == 4000
    before, after = saved["loop"][storage], again["loop"][storage]
    (written,), rows = before["written"], before["storage"]["rewards"].shape[0]
    assert after["written"] == [written + 1]
    last, cut = (written - 1) % rows, written % rows  # the last row written, the row the cut fills
    b, a = before["storage"], after["storage"]
    untouched = [r for r in range(rows) if r not in (last, cut, (cut + 1) % rows)]
    for field in b:
        assert torch.equal(b[field][untouched], a[field][untouched]), field
    assert a["dones"][last].all() and torch.equal(a["terminated"][last], b["terminated"][last])
    assert torch.equal(a["obs"][cut], b["obs"][cut])  # the last observation, bootstrapped from
    assert not a["valid"][cut].any() and not a["rewards"][cut].any() and not a["dones"][cut].any()
    assert after["prev_done"].sum() == 0  # the pseudo-step ended no episode
    if algo == "reinforce":  # the episodes in progress at the cut are never learned from
        assert after["learned"][last].all()
        assert (after["learned"] | ~before["learned"])[untouched].all()  # only ever set, outside the cut


def test_the_cut_ends_episodes_as_truncations_that_bootstrap_from_their_last_observation():
    gamma = 0.9
    ring = ReplayRing(40, 2, (1,), torch.device("cpu"), n_step=3, gamma=gamma)
    ring.start(torch.tensor([[0.0], [100.0]]))
    for t in range(1, 4):  # rewards 1, 2, 3, no episode ends
        ring.add(torch.zeros(2, dtype=torch.long), torch.full((2,), float(t)), torch.zeros(2, dtype=torch.bool),
                 torch.zeros(2, dtype=torch.bool), torch.tensor([[float(t)], [100.0 + t]]))
    ring.cut(torch.tensor([[-1.0], [-2.0]]))
    ring.add(torch.zeros(2, dtype=torch.long), torch.full((2,), 9.0), torch.zeros(2, dtype=torch.bool),
             torch.zeros(2, dtype=torch.bool), torch.tensor([[-1.5], [-2.5]]))
    from fastrl.buffer import transitions_at
    start, env = torch.tensor([1, 3, 4]), torch.tensor([0, 0, 1])
    age = torch.tensor(ring.written[0]) - start
    tr = transitions_at(ring.storage, start, env, age, 3, gamma)
    # Row 1 (reward 2): the window stops at the cut after rewards 2, 3, and bootstraps from obs 3.
    assert tr.returns[0].item() == pytest.approx(2 + gamma * 3) and tr.next_obs[0].item() == 3.0
    assert tr.discount[0].item() == pytest.approx(gamma ** 2) and tr.weight[0] == 1
    # Row 3 is the cut's pseudo-step: never learned from; row 4 starts the new episode.
    assert tr.weight[1] == 0
    assert tr.obs[2].item() == -2.0 and tr.returns[2].item() == 9.0 and tr.next_obs[2].item() == -2.5


def test_the_cut_of_a_rollout_buffer_drops_the_unfinished_episodes():
    buf = RolloutBuffer(12, 2, (1,), torch.device("cpu"))
    buf.start(torch.zeros(2, 1))
    for t in range(4):  # env 0 ends an episode after its second step; env 1 never does
        done = torch.tensor([t == 1, False])
        buf.add(torch.zeros(2, dtype=torch.long), torch.ones(2), done, torch.zeros(2, dtype=torch.bool),
                torch.zeros(2, 1))
    buf.cut(torch.zeros(2, 1))
    batch = buf.episodes(1.0)
    env = batch.slots[batch.mask] % 2
    assert (env == 1).sum() == 0  # env 1's episode was in progress: dropped
    assert (env == 0).sum() == 2  # env 0's finished episode (2 steps) is still learned from


def events(run_dir: Path, tag: str) -> list:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []


@contextlib.contextmanager
def cli_run(run_dir: Path, *args: str):
    cmd = [sys.executable, "-m", "fastrl", "train", "--env", "CartPole-v1", "--learner", "eager", "--num-envs", "4",
           "--hidden", "32", "--no-progress", "--log-interval", "0.2", "--run-dir", str(run_dir), *args]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_state(run_dir: Path, env_steps: int, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with contextlib.suppress(ValueError, FileNotFoundError, KeyError):
            if state_of(run_dir)["env_steps"] >= env_steps:
                return
        time.sleep(0.2)
    raise AssertionError(f"no state.pt past {env_steps} env steps in {seconds} s")


@pytest.mark.slow
@pytest.mark.parametrize("algo, stop", [("ddqn", signal.SIGTERM), ("ddqn", signal.SIGKILL),
                                        ("reinforce", signal.SIGKILL)],
                         ids=["ddqn, sigterm", "ddqn, kill -9", "reinforce, kill -9"])
def test_a_stopped_run_resumes_and_its_curves_go_on_at_the_same_step(tmp_path, algo, stop):
    run_dir = tmp_path / "run"
    # 8,192: REINFORCE's rollouts (4 envs x 64 steps) end there too.
    budget = ["--algo", algo, "--total-steps", "8192", "--eval-interval", "2000", "--eval-episodes", "10",
              "--no-stop-on-solve", "--checkpoint-interval", "1000steps"]
    with cli_run(run_dir, *budget) as proc:
        wait_for_state(run_dir, 3000)
        os.kill(proc.pid, stop)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if stop == signal.SIGTERM else -signal.SIGKILL), err
    saved = state_of(run_dir)
    if stop == signal.SIGTERM:  # saved where it stopped, and said how to go on
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["interrupted"] and summary["env_steps"] == saved["env_steps"]
    stopped_at = saved["env_steps"]
    out = subprocess.run([sys.executable, "-m", "fastrl", "train", "--resume", str(run_dir), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"resumed at {stopped_at:,} env steps" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not summary["interrupted"] and summary["env_steps"] == 8192 and summary["resumes"] == 1
    assert summary["final_eval_env_steps"] == summary["checkpoint_env_steps"] == 8192
    # One curve: what the stopped run wrote after its state was saved is hidden (purged),
    # and the resumed run's points follow on, without a restart or a gap.
    sps = [e.step for e in events(run_dir, "charts/sps")]
    assert sps == sorted(sps) and len(set(sps)) == len(sps), sps
    assert sps[-1] == 8192
    # The resumed run rewrites from its state's step on: the point there (a saved state ends
    # a log window) is its own, and the points on either side are a window or two apart.
    after_cut = [s for s in sps if s >= stopped_at]
    before_cut = [s for s in sps if s < stopped_at]
    windows = np.diff(before_cut).tolist() + np.diff(after_cut).tolist()
    assert stopped_at - before_cut[-1] <= max(windows) and after_cut[0] - stopped_at <= 2 * max(windows)
    evals = [e.step for e in events(run_dir, "eval/return_mean")]
    assert evals == sorted(set(evals)) and evals[-1] == 8192
    episodes = [e.step for e in events(run_dir, "episodes/return")]
    assert episodes == sorted(episodes) and episodes[-1] <= 8192


def test_a_resumed_writer_hides_what_the_stopped_run_wrote_after_its_state(tmp_path):
    from fastrl.run.logs import Writer
    first = Writer(str(tmp_path))
    first.scalars({"x": 1.0}, 0)
    first.series("y", [1.0, 2.0, 3.0], [10, 20, 30])  # 30: written after the state saved at 25
    first.close()
    time.sleep(1.1)  # event files are named by the second they were made in
    resumed = Writer(str(tmp_path), purge_step=25)
    resumed.series("y", [4.0, 5.0], [26, 40])
    resumed.close()
    assert [(e.step, e.value) for e in events(tmp_path, "y")] == [(10, 1.0), (20, 2.0), (26, 4.0), (40, 5.0)]


@pytest.mark.slow
def test_resume_refuses_what_it_cannot_go_on_with(tmp_path):
    run_dir = tmp_path / "run"
    fastrl.train(fastrl.make_config(**SETTINGS["ddqn"], run_dir=run_dir))
    cases = {
        "with lr=0.1: the run in": dict(lr=0.1),
        "with algo='reinforce'": dict(algo="reinforce"),
    }
    for message, change in cases.items():
        with pytest.raises(ConfigError, match=message):
            fastrl.train(fastrl.make_config(**{**SETTINGS["ddqn"], **change, "total_steps": 9000}), resume=run_dir)
    with pytest.raises(ConfigError, match=r"used its budget \(total_steps=3,000"):
        fastrl.train(resume=run_dir)
    with pytest.raises(ConfigError, match=r"used its time budget \(time_limit_s=0.5, "):
        fastrl.train(fastrl.make_config(**{**SETTINGS["ddqn"], "total_steps": 9000, "time_limit_s": 0.5}),
                     resume=run_dir)
    with pytest.raises(ConfigError, match="no config.json"):
        fastrl.train(resume=tmp_path)
    with pytest.raises(ConfigError, match="no such run directory"):
        fastrl.train(resume=tmp_path / "nowhere")
    data = bytearray((run_dir / "state.pt").read_bytes())
    data[len(data) // 2: len(data) // 2 + 400] = bytes(400)  # 400 bytes zeroed in the ring
    (run_dir / "state.pt").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="cannot resume: state .* (is corrupted|not a loadable)"):
        fastrl.train(fastrl.make_config(**{**SETTINGS["ddqn"], "total_steps": 9000}), resume=run_dir)
    (run_dir / "state.pt").write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(ConfigError, match="not a loadable fastrl state"):
        fastrl.train(fastrl.make_config(**{**SETTINGS["ddqn"], "total_steps": 9000}), resume=run_dir)
    (run_dir / "state.pt").unlink()
    with pytest.raises(ConfigError, match="holds no state.pt"):
        fastrl.train(fastrl.make_config(**{**SETTINGS["ddqn"], "total_steps": 9000}), resume=run_dir)


@pytest.mark.slow
def test_a_run_killed_after_its_last_state_but_before_its_summary_resumes_to_write_it(tmp_path):
    run_dir = tmp_path / "run"
    fastrl.train(fastrl.make_config(**SETTINGS["ddqn"], run_dir=run_dir))
    done = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").unlink()  # as a kill -9 while the curves were drawn leaves it
    summary = fastrl.train(resume=run_dir)
    assert not summary["interrupted"] and summary["resumes"] == 1
    assert (summary["env_steps"], summary["updates"]) == (done["env_steps"], done["updates"])  # no more training
    assert summary["final_eval_mean"] == done["final_eval_mean"]
    with pytest.raises(ConfigError, match="used its budget"):  # now it has its summary: done
        fastrl.train(resume=run_dir)


@pytest.mark.slow
def test_resume_from_the_command_line_takes_only_the_options_given(tmp_path):
    run_dir = tmp_path / "run"
    fastrl.train(fastrl.make_config(**SETTINGS["ddqn"], run_dir=run_dir))
    cmd = [sys.executable, "-m", "fastrl", "train", "--resume", str(run_dir)]
    out = subprocess.run([*cmd, "--lr", "0.5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "cannot resume with lr=0.5" in out.stderr
    out = subprocess.run([*cmd, "--total-steps", "3500", "--no-progress"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] == 3500 and summary["resumes"] == 1
    assert json.loads((run_dir / "config.json").read_text())["total_steps"] == 3500


# --- what resume relies on: checkpoints that prove they are whole, and say what they hold ---

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    fastrl.train(fastrl.make_config(**{**SETTINGS["ddqn"], "hidden": (64, 64)}, run_dir=run_dir))
    return run_dir


def refused_in_one_line(path: Path, message: str) -> None:
    """fastrl.load and `fastrl eval` both refuse `path` in one line matching `message`."""
    with pytest.raises(ValueError, match=message):
        fastrl.load(str(path))
    out = subprocess.run([sys.executable, "-m", "fastrl", "eval", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("fastrl eval: error: ") and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_checkpoint_with_bytes_changed_or_cut_is_refused_in_one_line(finished_run, tmp_path):
    data = (finished_run / "checkpoint.pt").read_bytes()
    weights = max(checkpoint.load(finished_run)["model"].values(), key=lambda w: w.numel())
    at = data.index(weights.numpy().tobytes()[:64]) + 1000  # inside the 64 x 64 weight matrix (16 kB)
    flipped = data[:at] + bytes(b ^ 0xFF for b in data[at:at + 400]) + data[at + 400:]
    (tmp_path / "flipped.pt").write_bytes(flipped)
    refused_in_one_line(tmp_path / "flipped.pt", "is corrupted: its contents do not match the checksum")
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    refused_in_one_line(tmp_path / "cut.pt", "is not a loadable fastrl checkpoint")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["no meta key", "a model that is not a state dict", "wrong shapes",
                                    "no config"])
def test_a_whole_checkpoint_of_the_wrong_contents_is_refused_in_one_line(finished_run, tmp_path, damage):
    payload = checkpoint.load(finished_run)
    payload.pop("sha256", None)
    messages = {"no meta key": "lacks meta n_actions", "a model that is not a state dict": "holds no network weights",
                "wrong shapes": "holds weights that do not fit the network its config describes",
                "no config": "holds no config"}
    if damage == "no meta key":
        del payload["meta"]["n_actions"]
    elif damage == "a model that is not a state dict":
        payload["model"] = [1, 2, 3]
    elif damage == "wrong shapes":
        payload["model"] = {k: torch.zeros(3, 3) for k in payload["model"]}
    else:
        payload["config"] = None
    checkpoint.save_payload(tmp_path / "damaged.pt", payload)  # its checksum matches: whole, but wrong
    refused_in_one_line(tmp_path / "damaged.pt", messages[damage])


@pytest.mark.slow
def test_after_a_stop_the_final_evaluation_and_the_checkpoint_describe_the_same_weights(tmp_path):
    run_dir = tmp_path / "run"
    with cli_run(run_dir, "--total-steps", "1e6", "--eval-interval", "1500", "--eval-episodes", "10",
                 "--no-stop-on-solve", "--checkpoint-interval", "300steps") as proc:
        wait_for_state(run_dir, 2000)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    summary = json.loads((run_dir / "summary.json").read_text())
    saved = checkpoint.load(run_dir)["meta"]
    assert summary["final_eval_env_steps"] == summary["checkpoint_env_steps"] == saved["env_steps"]
    assert saved["env_steps"] % 1500 < 100 and saved["env_steps"] < summary["env_steps"]
    assert saved["evaluation"]["mean"] == summary["final_eval_mean"]
    assert f"of the weights after {saved['env_steps']:,} env steps (checkpoint.pt)" in out
    assert f"go on with: fastrl train --resume {run_dir}" in out
