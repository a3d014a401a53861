"""Videos of greedy episodes: the env draws each frame (render_mode 'rgb_array', no display
needed) and imageio with its ffmpeg encodes them, frame by frame, into an MP4 (the
optional extra `video`). Written to a temporary file and renamed: a failed or interrupted
recording leaves no half-written video (see checkpoint.atomic_path)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple

import gymnasium as gym
import numpy as np
import torch

from fastrl.checkpoint import atomic_path
from fastrl.config import TrainConfig
from fastrl.errors import ConfigError
from fastrl.evaluation import EVAL_SEED_OFFSET


class Video(NamedTuple):
    path: str
    frames: int
    fps: float
    returns: list


def check_can_record(env_id: str, render_modes: tuple) -> None:
    """A one-line ConfigError if no video can be made: the env cannot draw frames (said
    first: installing the encoder would not help), or the encoder is not installed."""
    if "rgb_array" not in render_modes:
        raise ConfigError(f"{env_id} cannot draw frames for a video (its render modes: "
                          f"{', '.join(render_modes) or 'none'}; 'rgb_array' is needed)")
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise ConfigError("videos need imageio and its ffmpeg: pip install 'fastrl[video]' (or imageio "
                          "imageio-ffmpeg)") from None


def record(out: str | os.PathLike, config: TrainConfig, policy: Callable[[torch.Tensor], torch.Tensor],
           episodes: int, seed: int, device: torch.device | str = "cpu") -> Video:
    """Plays `episodes` greedy episodes one after another (env seeds as evaluation's, from
    `seed`) and writes their frames to the MP4 `out`, at the env's frame rate."""
    import imageio

    out = Path(out)
    # Frames are drawn off-screen: SDL (pygame, which gymnasium's envs draw with) needs
    # no display or sound device then, and complains of none.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    env_kwargs = {k: v for k, v in config.env_kwargs.items() if k != "render_mode"}
    env = gym.make(config.env_id, render_mode="rgb_array", **env_kwargs)
    fps = float(env.metadata.get("render_fps") or 30)
    frames, returns = 0, []
    try:
        # Even frame sizes (yuv420p, which every player reads): an odd one is padded.
        with atomic_path(out) as tmp, imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=2,
                                                          quality=7) as writer:
            for episode in range(episodes):
                obs, _ = env.reset(seed=EVAL_SEED_OFFSET + seed + episode)
                writer.append_data(np.asarray(env.render()))
                frames += 1
                done, total = False, 0.0
                while not done:
                    obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device).unsqueeze(0)
                    obs, reward, terminated, truncated, _ = env.step(int(policy(obs_t)[0]))
                    total += float(reward)
                    done = terminated or truncated
                    writer.append_data(np.asarray(env.render()))
                    frames += 1
                returns.append(total)
    finally:
        env.close()
    return Video(str(out), frames, fps, returns)
