"""What a run leaves for people and other programs: learning-curve plots, videos of
greedy episodes, and the policy exported to run without fastrl."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fastrl
from fastrl.cli import main
from fastrl.plot import median_band, moving_average, plot, read_curves
from fastrl.run.logs import Writer

# A log window longer than the runs: each run logs where its first window opens and where it
# ends, whatever the machine's speed, so the plots below do not depend on it.
RUN = dict(env_id="CartPole-v1", hidden=(32,), learner="eager", num_envs=4, total_steps=4000, eval_interval=2000,
           eval_episodes=10, eval_envs=5, stop_on_solve=False, progress=False, learning_starts=500,
           log_interval=600.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of one setting, and a third run of another setting."""
    root = tmp_path_factory.mktemp("runs")
    summaries = [fastrl.train(fastrl.make_config(**RUN, seed=seed, run_dir=root / f"seed{seed}")) for seed in (0, 1)]
    summaries.append(fastrl.train(fastrl.make_config(**{**RUN, "lr": 3e-3}, seed=0, run_dir=root / "lr")))
    return root, summaries


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, text: str) -> None:
    assert code == 2 and err.count("\n") == 1 and text in err, err


def test_moving_average_is_the_plain_loop():
    values = np.random.default_rng(0).normal(size=57)
    for window in (1, 5, 100):
        naive = [values[max(0, i - window + 1):i + 1].mean() for i in range(len(values))]
        assert np.allclose(moving_average(values, window), naive)


def test_the_median_band_is_the_plain_loop_over_the_runs_that_reach_each_x():
    rng = np.random.default_rng(2)
    xs = [np.sort(rng.uniform(lo, hi, 40)) for lo, hi in [(0, 100), (10, 60), (5, 90)]]
    ys = [rng.normal(size=40) for _ in xs]
    grid, (low, median, high) = median_band(xs, ys, points=50)
    assert grid[0] >= 5 and grid[-1] <= 90  # at least two runs reach every x drawn
    for i, x in enumerate(grid):
        reaching = [np.interp(x, xi, yi) for xi, yi in zip(xs, ys) if xi[0] <= x <= xi[-1]]
        assert len(reaching) >= 2
        assert np.allclose([low[i], median[i], high[i]], np.percentile(reaching, [25, 50, 75]))
    # Runs that share no x, and one run alone: no band, and no error.
    for apart in ([np.array([0.0, 1.0]), np.array([2.0, 3.0])], [np.array([0.0, 1.0])]):
        grid, band = median_band(apart, [np.ones(2)] * len(apart), points=50)
        assert len(grid) == 0 and [len(b) for b in band] == [0, 0, 0]


@pytest.mark.slow
def test_a_finished_run_draws_its_curves_from_what_it_logged(runs):
    root, summaries = runs
    summary = summaries[0]
    assert summary["curves"] == str(root / "seed0" / "curves.png")
    image = __import__("matplotlib.image").image.imread(summary["curves"])
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    curves = read_curves(root / "seed0")
    assert len(curves.episode_returns) > 50 and np.all(np.diff(curves.episode_steps) >= 0)
    assert curves.episode_steps[-1] <= summary["env_steps"]
    # Every episode the run counted is on the curve (CartPole pays 1 a step).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(root / "seed0"), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("charts/episodes")[-1].value == len(curves.episode_returns)
    assert np.all(curves.episode_returns >= 8) and np.all(curves.episode_returns <= 500)
    assert list(curves.eval_steps) == [2000, 4000]
    assert curves.eval_means[-1] == pytest.approx(summary["final_eval_mean"], rel=1e-6)  # float32 in the events
    assert np.all(np.diff(curves.log_wall_s) > 0) and curves.log_wall_s[-1] <= summary["wall_s"]
    # Shorter than one log window, it still maps steps to time: from its first step to its end.
    assert curves.log_steps[0] == RUN["num_envs"] and curves.log_steps[-1] == summary["env_steps"]


@pytest.mark.slow
def test_fastrl_plot_draws_seeds_as_a_median_and_refuses_bad_input_in_one_line(runs, capsys, tmp_path):
    root, _ = runs
    out = tmp_path / "seeds.png"
    code, printed, _ = cli(capsys, "plot", str(root / "seed0"), str(root / "seed1"), str(root / "lr"),
                           "--out", str(out), "--x", "wall", "--window", "20")
    assert code == 0 and printed == f"wrote {out}\n"
    image = __import__("matplotlib.image").image.imread(out)
    assert image.shape[0] > 300
    # Two seeds whose wall clocks never overlap (one started late) are drawn apart, not as a band.
    late = []
    for name, start in (("early", 1.0), ("late", 50.0)):
        late.append(tmp_path / "apart" / name)
        writer = Writer(str(late[-1]))
        writer.scalars({"time/wall_s": start}, 4)
        writer.series("episodes/return", [10.0, 20.0, 30.0], [100, 200, 300])
        writer.scalars({"time/wall_s": start + 2.0}, 300)
        writer.close()
    apart = tmp_path / "apart.png"
    written = plot(late, apart, x="wall", labels={str(d): "one setting" for d in late})
    assert written == apart and __import__("matplotlib.image").image.imread(apart).shape[0] > 300
    (tmp_path / "empty").mkdir()
    no_episodes = tmp_path / "no_episodes"
    writer = Writer(str(no_episodes))
    writer.scalars({"charts/sps": 1.0}, 10)
    writer.close()
    for argv, text in [
        (["plot", str(tmp_path / "missing")], "no such run directory"),
        (["plot", str(tmp_path / "empty")], "holds no TensorBoard events yet"),
        (["plot", str(no_episodes)], "no episode has ended in it yet"),
        (["plot", str(root / "seed0"), "--out", str(tmp_path / "x.jpg")], "must be a .png file"),
        (["plot", str(root / "seed0"), "--x", "time"], "invalid choice: 'time'"),
    ]:
        code, _, err = cli(capsys, *argv)
        one_line_error(code, err, text)
    written = ["apart", "apart.png", "empty", "no_episodes", "seeds.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == written  # nothing half-written


def mp4_frames(path: Path) -> tuple[int, float, float]:
    """(frames, fps, duration in s) read back from the file."""
    import imageio
    with imageio.get_reader(path) as reader:
        meta = reader.get_meta_data()
        frames = sum(1 for _ in reader)
    return frames, meta["fps"], meta["duration"]


@pytest.mark.slow
def test_eval_video_writes_an_mp4_of_the_greedy_episodes(runs, capsys, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    root, _ = runs
    out = tmp_path / "watch.mp4"
    code, printed, err = cli(capsys, "eval", str(root / "seed0"), "--video", str(out), "--episodes", "2",
                             "--seed", "3")
    assert code == 0 and err == "", err  # headless: not a word from SDL either
    frames, fps, duration = mp4_frames(out)
    returns = [float(r) for r in printed.split("returns ")[1].rstrip(")\n").split(", ")]
    assert frames == sum(returns) + 2  # CartPole pays 1 a step; a frame per step, plus each first one
    assert fps == 50 and duration == pytest.approx(frames / fps, abs=0.05)
    # The episodes an evaluation on the same env seed plays.
    assert returns[0] == fastrl.evaluate(root / "seed0", episodes=1, num_envs=1, seed=3).returns[0]
    code, printed, _ = cli(capsys, "eval", str(root / "seed0"), "--video")  # default: beside the checkpoint
    assert code == 0 and printed.startswith(f"wrote {root / 'seed0' / 'video.mp4'}: ")
    assert mp4_frames(root / "seed0" / "video.mp4")[0] > 3


def test_eval_video_refuses_an_env_that_cannot_draw_frames_in_one_line(capsys, tmp_path):
    run_dir = tmp_path / "run"
    fastrl.train(fastrl.make_config(env_id="fastrl-test/Terminating-v0", hidden=(8,), learner="eager",
                                    num_envs=2, backend="sync", total_steps=200, learning_starts=50,
                                    eval_interval=0, eval_episodes=2, eval_envs=2, progress=False, run_dir=run_dir))
    code, _, err = cli(capsys, "eval", str(run_dir), "--video", str(tmp_path / "v.mp4"))
    one_line_error(code, err, "cannot draw frames for a video (its render modes: none; 'rgb_array' is needed)")
    code, _, err = cli(capsys, "eval", str(run_dir), "--video", "--render")
    one_line_error(code, err, "--render and --video: choose one")
    assert not (tmp_path / "v.mp4").exists() and not list(tmp_path.glob(".v.*"))


@pytest.mark.slow
def test_a_training_run_can_record_a_video_of_its_final_weights(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    summary = fastrl.train(fastrl.make_config(**{**RUN, "total_steps": 1000}, video=True, run_dir=tmp_path))
    assert summary["video"] == str(tmp_path / "video.mp4")
    frames, fps, _ = mp4_frames(tmp_path / "video.mp4")
    assert frames >= 9 and fps == 50


LOAD_WITHOUT_FASTRL = textwrap.dedent("""
    import sys
    sys.modules["fastrl"] = None  # any import of fastrl fails: the file must run without it
    import numpy as np
    obs = np.load(sys.argv[2])
    if sys.argv[1].endswith(".pt2"):
        import torch
        policy = torch.export.load(sys.argv[1]).module()
        actions = policy(torch.from_numpy(obs)).numpy()
    else:
        import onnxruntime
        actions = onnxruntime.InferenceSession(sys.argv[1]).run(None, {"obs": obs})[0]
    np.save(sys.argv[3], actions)
""")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_an_exported_policy_acts_as_fastrl_does_in_a_process_without_fastrl(runs, capsys, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    root, _ = runs
    out = tmp_path / f"policy.{fmt}"
    code, printed, _ = cli(capsys, "export", str(root / "seed0"), "--format", fmt, "--out", str(out))
    assert code == 0 and printed == f"wrote {out}\n"
    # Observations as CartPole gives them, and far outside: any batch size.
    obs = np.random.default_rng(1).normal(scale=[1.0, 2.0, 0.2, 2.0], size=(333, 4)).astype(np.float32)
    np.save(tmp_path / "obs.npy", obs)
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_FASTRL)
    done = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "obs.npy"),
                           str(tmp_path / "actions.npy")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _, _, greedy = fastrl.load(root / "seed0")
    expected = greedy(torch.from_numpy(obs)).numpy()
    got = np.load(tmp_path / "actions.npy")
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    assert 0 < expected.mean() < 1  # both actions taken: a real comparison
    if fmt == "pt2":  # the config rides along
        extra = {"fastrl.json": ""}
        torch.export.load(out, extra_files=extra)
        assert json.loads(extra["fastrl.json"])["env_id"] == "CartPole-v1"


def test_export_refuses_bad_input_in_one_line(capsys, tmp_path):
    for argv, text in [
        (["export", str(tmp_path / "missing")], "does not exist"),
        (["export", str(tmp_path)], "is a directory without a checkpoint.pt"),
        (["export", str(tmp_path), "--format", "tflite"], "invalid choice: 'tflite'"),
    ]:
        code, _, err = cli(capsys, *argv)
        one_line_error(code, err, text)
    assert list(tmp_path.iterdir()) == []
