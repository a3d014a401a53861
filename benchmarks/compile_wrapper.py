"""The compiled DDQN learner step on the CPU with and without inductor's C++ wrapper
(generated C++, not Python, calls the step's compiled kernels; `fastrl.accel.compile_fn`
uses it on the CPU). Both run in one process, in alternating blocks of updates whose
order swaps every block, so the VM's drift moves both alike; the ratio is taken per
pair of blocks, then the median.

    python benchmarks/compile_wrapper.py --batch-sizes 64 256 1024 --blocks 30
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from fastrl import accel
from fastrl.algos import ddqn
from fastrl.bench import _filled_ring, machine
from fastrl.nets import build_network
from fastrl.optim import Adam

ENV = "LunarLander-v3"


def learn_step(ring, config, spec, batch_size: int, cpp_wrapper: bool):
    torch.manual_seed(0)
    q = build_network(config, spec.obs_shape, spec.n_actions)
    q_target = copy.deepcopy(q).requires_grad_(False)
    step = ddqn.make_learn_step(ring.sampler(batch_size), q, q_target, Adam(q, config.lr, config.max_grad_norm),
                                config.tau, config.target_update_interval, "eager")
    # With no device, compile_fn compiles as it does off the CPU: without the C++ wrapper.
    return accel.compile_fn(step, device=torch.device("cpu") if cpp_wrapper else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--blocks", type=int, default=30, help="pairs of blocks per batch size")
    parser.add_argument("--updates", type=int, default=100, help="updates per block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ring, config, spec = _filled_ring(ENV, torch.device("cpu"), 0)
    print(f"{machine()}\n{ENV} preset (MLP {'x'.join(map(str, config.hidden))}), 1 torch thread; "
          f"{args.blocks} pairs of {args.updates}-update blocks\n")
    print("| batch | Python wrapper, ms/update | C++ wrapper, ms/update | speed-up, median (quartiles) |")
    print("|---:|---:|---:|---|")
    for batch_size in args.batch_sizes:
        steps = {w: learn_step(ring, config, spec, batch_size, w) for w in (False, True)}
        for step in steps.values():
            for _ in range(20):  # compile, then warm up
                step()
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for block in range(args.blocks):
            for w in ((False, True) if block % 2 == 0 else (True, False)):
                start = time.perf_counter()
                for _ in range(args.updates):
                    steps[w]()
                seconds[w].append((time.perf_counter() - start) / args.updates)
        ratios = [p / c for p, c in zip(seconds[False], seconds[True])]
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        print(f"| {batch_size} | {statistics.median(seconds[False]) * 1e3:.3f} | "
              f"{statistics.median(seconds[True]) * 1e3:.3f} | {median:.2f} × ({q1:.2f}–{q3:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
