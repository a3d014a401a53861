"""Command line: a thin layer over fastrl.train() and fastrl.evaluate().

    fastrl train [--env ID] [--algo ddqn] [options]     (every TrainConfig field is an option)
    fastrl profile [train options] [--steps N]           where the training time goes
    fastrl train --resume RUN_DIR [options]              go on with a stopped run
    fastrl eval CHECKPOINT [--episodes 100] [--seed S] [--render | --video [PATH]]
    fastrl plot RUN_DIR [RUN_DIR ...] [--out FILE.png]   learning curves
    fastrl export RUN_DIR [--format pt2|onnx]            the greedy policy, to run without fastrl
    fastrl bench collect|learn|all [options]             throughput, side by side
    fastrl sweep --seeds 0-4 --set lr=5e-4,1e-3 [train options] [--ray [ADDRESS]]   a grid x seeds
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

from fastrl.config import DEVICES, LEARNER_MODES, PRESETS, VARIANTS, TrainConfig, busy_cores, make_config
from fastrl.errors import ConfigError, Diverged, EnvError, WorkerDied, WriteFailed
from fastrl.interrupts import import_held
from fastrl.system import thread_limit


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A subcommand's parser: it reports the arguments it does not know itself, naming
    the command and its --help (argparse leaves them to `fastrl`, whose --help lists none)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return namespace, unknown


def _option_name(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("cli", f.name).replace("_", "-")


def parse_env_kwargs(items: list[str]) -> dict:
    """['enable_wind=true', 'wind_power=15'] -> {'enable_wind': True, 'wind_power': 15}."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid env_kwargs item {item!r}: must be KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a plain string
    return out


def integer(text: str) -> int:
    """An int option's value, in scientific notation too: "1e6" is 1000000, as in Python code."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # not a number: ValueError, which argparse reports in one line
        if not value.is_integer():
            raise ValueError(text) from None
        return int(value)


def _add_train_options(parser: argparse.ArgumentParser, profiling: bool = False) -> None:
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        hidden = f.metadata.get("cli", "") is None
        if hidden or (f.metadata.get("scope") == "profile" and not profiling):
            continue
        doc, default = f.metadata["doc"], getattr(defaults, f.name)
        name = _option_name(f)
        if f.type == "bool":
            parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{doc} (default: {default})")
        elif f.type == "tuple":
            parser.add_argument(name, dest=f.name, type=integer, nargs="+", default=None, metavar="W",
                                help=f"{doc} (default: {' '.join(map(str, default))})")
        elif f.type == "dict":
            parser.add_argument(name, dest=f.name, nargs="*", default=None, metavar="KEY=VALUE",
                                help=f"{doc} (default: none)")
        else:
            kind = {"int": integer, "float": float, "str": str}[f.type]
            shown = "auto" if f.name == "run_dir" else default
            parser.add_argument(name, dest=f.name, type=kind, default=None,
                                help=f"{doc} (default: {shown})")


def train_tokens(args: argparse.Namespace) -> list[str]:
    """The train options given in `args`, written back as command-line words."""
    words = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        name = _option_name(f)
        if f.type == "bool":
            words.append(name if value else "--no-" + name[2:])
        elif f.type in ("tuple", "dict"):
            words += [name, *map(str, value)]
        else:
            words += [name, str(value)]
    return words


def _presets_epilog() -> str:
    lines = ["presets (applied before your options; your options win):"]
    for (algo, env_id), values in PRESETS.items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        lines.append(f"  {algo} on {env_id}: {shown}")
        for keyword, settings in VARIANTS.get((algo, env_id), {}).items():
            shown = ", ".join(f"{k}={v}" for k, v in settings.items())
            lines.append(f"    with --env-kwargs {keyword}=true, also: {shown}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastrl", description="High-throughput small-scale deep RL in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    train_p = sub.add_parser("train", help="train an agent (default: Double DQN on LunarLander-v3)",
                             epilog=_presets_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train_p.add_argument("--resume", metavar="RUN_DIR", default=None,
                         help="go on with the stopped run in RUN_DIR from its last saved state (state.pt); options "
                              "given may change only its budgets, checkpointing and logging")
    _add_train_options(train_p)
    profile_p = sub.add_parser(
        "profile", help="short training run that shows where the time goes",
        description="Runs a short training (any train option applies), then prints the seconds and share "
                    "of wall time per phase, env steps/s and updates/s, the bottleneck and the knob for it; "
                    "writes a torch.profiler trace (Chrome/Perfetto JSON) and a top-operators table.",
        epilog=_presets_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_options(profile_p, profiling=True)
    eval_p = sub.add_parser("eval", help="greedy evaluation of a checkpoint")
    eval_p.add_argument("checkpoint", help="path to a checkpoint.pt written by fastrl train")
    eval_p.add_argument("--episodes", type=integer, default=None,
                        help="episodes to run (default: 100; 3 with --render)")
    eval_p.add_argument("--seed", type=integer, default=0,
                        help="evaluation seed; env seeds stay disjoint from training (default: 0)")
    eval_p.add_argument("--envs", type=integer, default=20, help="vectorized eval envs (default: 20)")
    eval_p.add_argument("--device", default="cpu", help="device for the network: auto | cpu | cuda (default: cpu)")
    eval_p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="a live progress line on stderr, when it is a terminal (default: True)")
    eval_p.add_argument("--render", action="store_true",
                        help="watch the agent: the episodes play one after another in a window, at the env's "
                             "frame rate (default: off)")
    eval_p.add_argument("--video", nargs="?", const="", default=None, metavar="PATH",
                        help="record the episodes (default 3) to an MP4 instead, headless (default PATH: video.mp4 "
                             "beside the checkpoint; needs the video extra)")
    plot_p = sub.add_parser(
        "plot", help="learning curves of runs as a PNG",
        description="Each episode's return with its moving average, and the greedy evaluations' mean ± std, "
                    "against env steps (or wall-clock seconds), read from the runs' TensorBoard events. Runs of "
                    "one setting (seeds) are drawn as the median with the interquartile band.")
    plot_p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by fastrl train")
    plot_p.add_argument("--out", default=None,
                        help="the PNG to write (default: RUN_DIR/curves.png for one run, curves.png for several)")
    plot_p.add_argument("--x", default="steps", choices=("steps", "wall"),
                        help="x axis: env steps, or wall-clock seconds of training (default: steps)")
    plot_p.add_argument("--window", type=integer, default=100, help="episodes in the moving average (default: 100)")
    export_p = sub.add_parser(
        "export", help="the greedy policy as a file that runs without fastrl (torch.export .pt2 or ONNX)",
        description="Writes the greedy policy of a checkpoint: observations [B, *obs] float32 in, actions [B] "
                    "int64 out. pt2 loads with plain torch (torch.export.load(PATH).module()); onnx runs in "
                    "onnxruntime (needs the onnx extra).")
    export_p.add_argument("checkpoint", help="a checkpoint.pt, or a run directory holding one")
    export_p.add_argument("--format", default="pt2", choices=("pt2", "onnx"), help="file format (default: pt2)")
    export_p.add_argument("--out", default=None, help="the file to write (default: policy.<format> beside the "
                                                      "checkpoint)")
    sweep_p = sub.add_parser(
        "sweep", help="a grid of settings x seeds, each trial a run dir; a results table and curves per setting",
        description="Runs one fastrl train per setting and seed: on this machine, as many at once as its cores "
                    "hold, or with --ray as Ray tasks on a cluster. A trial that dies is retried from its last "
                    "saved state. Writes results.txt, results.json and curves.png in --out; a stopped sweep goes "
                    "on with --resume. Any train option applies to every trial.")
    sweep_p.add_argument("--seeds", default="0-2", help="seeds of each setting: 0-9, 0,3,7 or both (default: 0-2)")
    sweep_p.add_argument("--set", dest="grid", action="append", default=[], metavar="NAME=V1,V2",
                         help="a train option's values to sweep (repeat for a grid; several words for a list "
                              "option: --set 'hidden=64 64,128 128')")
    sweep_p.add_argument("--out", default=None, help="the sweep's folder (default: runs/sweep__<time>)")
    sweep_p.add_argument("--parallel", type=integer, default=0,
                         help="trials at once on this machine (default: as many as its cores hold, given each "
                              "trial's env workers and threads)")
    sweep_p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                         help="run each trial as a Ray task: on the cluster at ADDRESS (HOST:PORT, auto), or "
                              "RAY_ADDRESS's, else a local Ray instance (needs the ray extra)")
    sweep_p.add_argument("--gpus-per-trial", type=float, default=0.0, help="[--ray] GPUs (or a fraction) per trial")
    sweep_p.add_argument("--retries", type=integer, default=2,
                         help="times a trial whose process or node dies is resumed (default: 2)")
    sweep_p.add_argument("--resume", metavar="SWEEP_DIR", default=None,
                         help="go on with the stopped sweep in SWEEP_DIR: finished trials are kept, the others "
                              "resumed from their saved state")
    _add_train_options(sweep_p)
    bench_p = sub.add_parser(
        "bench", help="throughput: collector steps/s per backend and env count, learner updates/s per mode",
        description="collect: env steps/s into the replay ring per backend and env count, next to the raw env "
                    "in one process (x cores = the machine's limit) and plain AsyncVectorEnv, interleaved in "
                    "rounds. learn: updates/s of the Double-DQN learner per mode and batch size. Prints tables; "
                    "writes bench.json and collect.png.")
    bench_p.add_argument("what", choices=("collect", "learn", "all"), help="what to measure")
    bench_p.add_argument("--env", default="LunarLander-v3", help="gymnasium env id (default: LunarLander-v3)")
    bench_p.add_argument("--num-envs", type=integer, nargs="+", default=[8, 16, 32, 64, 128, 256], metavar="N",
                         help="env counts for collect (default: 8 16 32 64 128 256)")
    bench_p.add_argument("--batch-sizes", type=integer, nargs="+", default=[64, 256, 1024], metavar="B",
                         help="batch sizes for learn (default: 64 256 1024)")
    bench_p.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                         help="learner modes for learn: eager compile cudagraphs (default: eager compile, "
                              "plus cudagraphs on CUDA)")
    bench_p.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement (default: 2)")
    bench_p.add_argument("--rounds", type=integer, default=3, help="interleaved rounds; medians reported (default: 3)")
    bench_p.add_argument("--device", default="auto", help="device for the ring and learner: auto | cpu | cuda")
    bench_p.add_argument("--threads", type=integer, default=1, help="torch CPU threads, as in training (default: 1)")
    bench_p.add_argument("--out", default="", help="output directory (default: runs/bench__<env>__<time>)")
    return parser


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None, **fixed) -> TrainConfig:
    """The options given, over `base` (a resumed run's config) or else the defaults and preset."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    overrides.update(fixed)
    if "env_kwargs" in overrides:
        overrides["env_kwargs"] = parse_env_kwargs(overrides["env_kwargs"])
    return dataclasses.replace(base, **overrides) if base is not None else make_config(**overrides)


def _train(args: argparse.Namespace) -> int:
    from fastrl.run.resume import saved_config
    from fastrl.training import train

    if args.resume is not None:
        summary = train(config_from_args(args, base=saved_config(args.resume)), resume=args.resume)
    else:
        summary = train(config_from_args(args))
    return 130 if summary["interrupted"] else 0


def _sweep(args: argparse.Namespace) -> int:
    from fastrl import sweep

    for name, why in (("seed", "use --seeds"), ("run_dir", "the sweep names each trial's run dir in --out")):
        if getattr(args, name) is not None:
            raise ConfigError(f"invalid --{name.replace('_', '-')} for a sweep: {why}")
    if args.resume is not None:
        if train_tokens(args) or args.grid:
            raise ConfigError("a resumed sweep runs the plan in its sweep.json: give --resume alone")
        out = Path(args.resume).absolute()
        plan = sweep.load_plan(out)
    else:
        if args.parallel < 0 or args.retries < 0 or args.gpus_per_trial < 0:
            raise ConfigError(f"invalid --parallel={args.parallel}, --retries={args.retries} or --gpus-per-trial="
                              f"{args.gpus_per_trial}: must be >= 0")
        seeds, grid, base = sweep.parse_seeds(args.seeds), sweep.parse_grid(args.grid), train_tokens(args)
        if args.ray is not None:  # said before the sweep's folder is made
            from fastrl import cluster

            cluster.import_ray()
            cluster.check_reachable(args.ray)
        parser = build_parser()
        configs = []
        for values in itertools.product(*grid.values()):  # every setting checked before any trial starts
            words = ["train", *base, *sweep.setting_args(dict(zip(grid, values)))]
            configs.append(config_from_args(parser.parse_args(words)))
        # Absolute: a trial may run as a Ray task in another working directory, or on another node.
        out = Path(args.out or f"runs/sweep__{time.strftime('%Y%m%d-%H%M%S')}").absolute()
        widest = max(configs, key=busy_cores)
        plan = sweep.plan_sweep(out, base, widest, grid, seeds, args.parallel, args.ray, args.gpus_per_trial,
                                args.retries)
    try:
        results = sweep.run_sweep(out, plan)
    except KeyboardInterrupt:
        print(f"sweep stopped; go on with: fastrl sweep --resume {out}", file=sys.stderr)
        return 130
    print(sweep.format_results(results), end="")
    print(f"results: {out / 'results.txt'}, {out / 'results.json'}, {out / 'curves.png'}")
    failed = [r for r in results["trials"] if r["status"] != "finished"]
    return 1 if failed else 0


def _profile(args: argparse.Namespace) -> int:
    from fastrl.profile import format_report
    from fastrl.training import train

    # Steady-state training only: no evaluations; the session ends the run.
    fixed = dict(profile=True, stop_on_solve=False, total_steps=10**12)
    if args.eval_interval is None:
        fixed["eval_interval"] = 0
    summary = train(config_from_args(args, **fixed))
    if summary["profile"] is None:
        print("fastrl profile: interrupted before the profile was complete", file=sys.stderr)
        return 130
    print(format_report(summary["profile"]))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fastrl.evaluation import evaluate_checkpoint
    from fastrl.training import resolve_device

    if args.device not in DEVICES:
        raise ConfigError(f"invalid --device={args.device!r}: must be {' or '.join(DEVICES)}")
    device = resolve_device(args.device)  # cuda with no CUDA device: a ConfigError
    if args.video is not None:
        return _record_video(args, device)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.episodes, args.seed, device, args.envs, args.progress,
                                     args.render)
    except ValueError as exc:  # a bad value (a ConfigError already) or an unreadable checkpoint
        raise ConfigError(str(exc)) from None
    print(f"{result.mean:.2f} ± {result.std:.2f} over {result.episodes} episodes")
    return 0


def _record_video(args: argparse.Namespace, device) -> int:
    from fastrl.envs import inspect_env
    from fastrl.evaluation import load_policy
    from fastrl.video import check_can_record, record

    if args.render:
        raise ConfigError("--render and --video: choose one (a window, or an MP4)")
    episodes = 3 if args.episodes is None else args.episodes
    if episodes < 1:
        raise ConfigError(f"invalid --episodes={episodes}: must be a positive integer")
    try:
        config, _, greedy = load_policy(args.checkpoint, device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    spec = inspect_env(config.env_id, {k: v for k, v in config.env_kwargs.items() if k != "render_mode"})
    check_can_record(config.env_id, spec.render_modes)
    where = Path(args.checkpoint)
    out = args.video or str((where if where.is_dir() else where.parent) / "video.mp4")
    if not out.endswith(".mp4"):
        raise ConfigError(f"invalid --video={out!r}: must be an .mp4 file")
    video = record(out, config, greedy, episodes, args.seed, device)
    returns = ", ".join(f"{r:.1f}" for r in video.returns)
    print(f"wrote {video.path}: {video.frames} frames, {video.frames / video.fps:.1f} s at {video.fps:g} fps "
          f"({episodes} episodes, returns {returns})")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from fastrl.plot import plot

    out = args.out or (str(Path(args.run_dirs[0]) / "curves.png") if len(args.run_dirs) == 1 else "curves.png")
    print(f"wrote {plot(args.run_dirs, out, args.x, args.window)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fastrl.export import export

    print(f"wrote {export(args.checkpoint, args.format, args.out)}")
    return 0


def _bench(args: argparse.Namespace) -> int:

    from fastrl.bench import run_bench

    def positive(name: str, values: list) -> None:
        bad = [v for v in values if not 0 < v < math.inf]  # nan or inf would measure forever
        if bad:
            raise ConfigError(f"invalid --{name}={bad[0]}: must be positive")

    positive("num-envs", args.num_envs)
    positive("batch-sizes", args.batch_sizes)
    positive("seconds", [args.seconds])
    positive("rounds", [args.rounds])
    positive("threads", [args.threads])
    if args.threads > thread_limit():
        raise ConfigError(f"invalid --threads={args.threads}: must be at most {thread_limit()} (this machine's CPUs)")
    if args.device not in DEVICES:
        raise ConfigError(f"invalid --device={args.device!r}: must be {' or '.join(DEVICES)}")
    modes = args.modes
    if modes is None:
        import torch
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        modes = [m for m in LEARNER_MODES if m != "cudagraphs" or cuda]
    for mode in modes:
        if mode not in LEARNER_MODES:
            raise ConfigError(f"invalid --modes value {mode!r}: must be {' or '.join(LEARNER_MODES)}")
    out = args.out or f"runs/bench__{args.env}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_bench(args.what, args.env, args.num_envs, args.batch_sizes, modes, args.seconds, args.rounds,
              args.device, args.threads, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import_held("fastrl.training")  # torch, gymnasium and the rest
        commands = {"train": _train, "profile": _profile, "eval": _eval, "plot": _plot, "export": _export,
                    "bench": _bench, "sweep": _sweep}
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"fastrl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (WorkerDied, WriteFailed, EnvError, Diverged) as exc:  # a run has saved what it could: summary, checkpoint
        if isinstance(exc, EnvError) and exc.trace:  # the env's own traceback, for whoever wrote the env
            print(exc.trace.rstrip(), file=sys.stderr)
        print(f"fastrl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before or after a training loop (which stops on request: see StopRequest)
        print(f"fastrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
