"""The compiled DDQN learner step with denormal numbers flushed to zero and not, from a
run's saved state (its weights, target, optimizer moments and replay ring), on the CPU.

A run saves `state.pt` as it trains; its optimizer's first moments then hold the
denormals that dead ReLU units leave behind, which a fresh network has none of. Both
settings run in one process, in alternating blocks of updates that restart from the
saved state and swap order every block, so the VM's drift moves both alike; the ratio
is taken per pair of blocks, then the median.

    python benchmarks/denormals.py RUN_DIR --blocks 20
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path

import torch

from fastrl import accel, checkpoint
from fastrl.algos import ddqn
from fastrl.bench import machine
from fastrl.envs import inspect_env
from fastrl.errors import ConfigError
from fastrl.nets import build_network
from fastrl.optim import Adam
from fastrl.run.resume import saved_config
from fastrl.training import replay_ring


def count_denormals(tensors: dict[str, torch.Tensor]) -> int:
    smallest_normal = torch.finfo(torch.float32).tiny
    return sum(int(((t != 0) & (t.abs() < smallest_normal)).sum()) for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a DDQN run directory with a state.pt")
    parser.add_argument("--blocks", type=int, default=20, help="pairs of blocks")
    parser.add_argument("--updates", type=int, default=200, help="updates per block")
    args = parser.parse_args()
    if args.blocks < 2 or args.updates < 1:
        parser.error(f"--blocks {args.blocks} --updates {args.updates}: at least 2 pairs of blocks of 1 update or more")
    try:
        config = saved_config(args.run_dir)
        state = checkpoint.load_payload(Path(args.run_dir) / "state.pt", checkpoint.STATE_FORMAT, "state")
    except (ConfigError, OSError, ValueError) as exc:
        parser.error(f"{args.run_dir}: {exc}")
    if config.algo != "ddqn":
        parser.error(f"{args.run_dir} is a run of algo={config.algo!r}; this times the DDQN learner step")
    saved = state["loop"]
    torch.set_num_threads(1)
    device = torch.device("cpu")
    spec = inspect_env(config.env_id, config.env_kwargs)
    ring = replay_ring(config, spec, device)
    ring.load_state_dict(saved["ring"])
    q = build_network(config, spec.obs_shape, spec.n_actions)
    q_target = copy.deepcopy(q).requires_grad_(False)
    optimizer = Adam(q, config.lr, config.max_grad_norm)

    def restore() -> None:
        q.load_state_dict(saved["q"])
        q_target.load_state_dict(saved["q_target"])
        optimizer.load_state_dict(saved["optimizer"])

    restore()
    learn = ddqn.make_learn_step(ring.sampler(config.batch_size), q, q_target, optimizer, config.tau,
                                 config.target_update_interval, "compile", priorities=ring.priorities)
    for _ in range(20):  # compile, then warm up
        learn()
    moments = saved["optimizer"]
    print(f"{machine()}\n{args.run_dir}: {state['env_steps']:,} env steps; denormals in Adam's first moments "
          f"{count_denormals(moments['exp_avg']):,}, second {count_denormals(moments['exp_avg_sq']):,}\n"
          f"{args.blocks} pairs of {args.updates}-update blocks, 1 torch thread\n")
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for block in range(args.blocks):
        for flushed in ((False, True) if block % 2 == 0 else (True, False)):
            restore()
            with accel.denormals_flushed() if flushed else contextlib.nullcontext():
                start = time.perf_counter()
                for _ in range(args.updates):
                    learn()
                seconds[flushed].append((time.perf_counter() - start) / args.updates)
    ratios = [kept / flushed for kept, flushed in zip(seconds[False], seconds[True])]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    print("| denormals kept, ms/update | flushed, ms/update | speed-up, median (quartiles) |\n|---:|---:|---|")
    print(f"| {statistics.median(seconds[False]) * 1e3:.3f} | {statistics.median(seconds[True]) * 1e3:.3f} | "
          f"{median:.2f} × ({q1:.2f}–{q3:.2f}) |")


if __name__ == "__main__":
    main()
