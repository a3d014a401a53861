"""Runs a command against a simulated Ray cluster of several nodes on this machine
(`ray.cluster_utils.Cluster`: one raylet per node, as on a real cluster), with
RAY_ADDRESS set to it, then shuts the cluster down. For trying the ray backend and Ray
sweeps across nodes without a cluster:

    python benchmarks/ray_local_cluster.py -- fastrl train --env CartPole-v1 --backend ray --num-workers 2
    python benchmarks/ray_local_cluster.py --nodes 2 --cpus 2 -- fastrl sweep --ray --seeds 0-2 --env CartPole-v1

Prints the cluster's address and the command's wall time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from ray.cluster_utils import Cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs each node offers Ray")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=args.cpus)
    cluster.wait_for_nodes()
    print(f"a Ray cluster of {args.nodes} nodes, {args.cpus} CPU(s) each, at {cluster.address}", flush=True)
    try:
        started = time.perf_counter()
        code = subprocess.call(command, env={**os.environ, "RAY_ADDRESS": cluster.address})
        print(f"exit code {code} after {time.perf_counter() - started:.1f} s", flush=True)
        return code
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
