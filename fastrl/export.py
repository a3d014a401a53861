"""The greedy policy of a checkpoint as a file that runs without fastrl: observations
[B, *obs_shape] float32 in, actions [B] int64 out (the argmax of the network's outputs),
for any batch size B.

  pt2   torch.export's ExportedProgram: plain torch loads it,
        `torch.export.load(path).module()(obs)`; the run's config rides along as
        extra file "fastrl.json"
  onnx  ONNX (the optional extra `onnx`): onnxruntime, or any ONNX runtime, runs it;
        input "obs", output "action"
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from fastrl import checkpoint as checkpoints
from fastrl.checkpoint import atomic_path, atomic_write, writing
from fastrl.errors import ConfigError
from fastrl.evaluation import load_policy

FORMATS = ("pt2", "onnx")


class GreedyPolicy(torch.nn.Module):
    """obs [B, *obs_shape] -> argmax actions [B]."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.network(obs).argmax(dim=1)


def export(checkpoint: str | os.PathLike, fmt: str = "pt2", out: str | os.PathLike | None = None) -> Path:
    """Writes the greedy policy of `checkpoint` (a checkpoint.pt or a run directory) as
    `fmt`; returns the file's path (default: policy.<fmt> beside the checkpoint). Written
    atomically: a failed export leaves nothing half-written."""
    if fmt not in FORMATS:
        raise ConfigError(f"invalid format={fmt!r}: must be {' or '.join(FORMATS)}")
    where = Path(checkpoint)
    out = Path(out) if out is not None else (where if where.is_dir() else where.parent) / f"policy.{fmt}"
    if out.suffix != f".{fmt}":
        raise ConfigError(f"invalid out={str(out)!r}: a {fmt} export must end in .{fmt}")
    try:
        config, network, _ = load_policy(str(checkpoint))
        obs_shape = tuple(checkpoints.load(checkpoint)["meta"]["obs_shape"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    policy = GreedyPolicy(network).eval()
    example = torch.zeros(2, *obs_shape)  # the batch size is left free: any B works
    batch = {0: torch.export.Dim("batch")}
    if fmt == "pt2":
        program = torch.export.export(policy, (example,), dynamic_shapes=(batch,))
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={"fastrl.json": json.dumps(config.to_dict())})
        atomic_write(out, buffer.getvalue())
    else:
        _export_onnx(policy, example, batch, out)
    return out


def _export_onnx(policy: GreedyPolicy, example: torch.Tensor, batch: dict, out: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("an ONNX export needs onnx and onnxscript: pip install 'fastrl[onnx]'") from None
    # torch's ONNX exporter reports each of its stages and warns of what it skips: quiet here.
    with writing(out), atomic_path(out) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(policy, (example,), tmp, dynamic_shapes=(batch,), input_names=["obs"],
                          output_names=["action"], verbose=False, external_data=False)
