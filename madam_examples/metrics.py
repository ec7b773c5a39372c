"""What a ``sharded_train`` run did, as JSON (``--metrics-out``).

Steps, losses, validation losses, skipped steps, per-leaf checksums (float64
sums of absolute values, over all processes) of the parameters and the
optimizer state, bytes per device and step times: so that runs on different
layouts, or resumed ones, can be compared from outside.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import numpy as np

from madam_examples import memory
from madam_examples import processes


def leaf_checksums(tree: Any) -> dict[str, float]:
  """Float64 sum of absolute values of each leaf (whole, over processes).

  Each process sums the shards it holds (one copy of each, however
  replicated) and the per-process sums are added in process order, so the
  same layout gives the same bits. A collective with several processes:
  every process must call it.

  Example:
    >>> import jax.numpy as jnp
    >>> leaf_checksums({'w': jnp.array([1.5, -2.0])})
    {"['w']": 3.5}
  """
  names, local = [], []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names.append(jax.tree_util.keystr(path))
    local.append(
      math.fsum(
        float(np.sum(np.abs(np.asarray(shard.data, np.float64))))
        for shard in x.addressable_shards
        if shard.replica_id == 0
      )
    )
  per_process = processes.gather(np.asarray(local, np.float64))
  return {name: math.fsum(per_process[:, i]) for i, name in enumerate(names)}


def gather_ints(value: int) -> list[int]:
  """Every process's ``value``, in process order (a collective).

  Example:
    >>> gather_ints(3)               # one process
    [3]
  """
  values = processes.gather(np.array([value], np.int64))
  return [int(x) for x in values.reshape(-1)]


def run_metrics(config: Any, result: dict[str, Any]) -> dict[str, Any]:
  """What a run did, JSON-able (a collective: every process calls it).

  ``skipped_steps_per_process`` is each process's own count of the steps it
  skipped: equal on every process when the skip decision is global.
  """
  state, run = result["state"], result["run"]
  steps = result["resumed_from"] + len(result["losses"])
  params = leaf_checksums(state.params)
  opt_state = leaf_checksums(state.opt_state)
  times = np.asarray(result["step_seconds"][1:] or result["step_seconds"])
  param_bytes = memory.bytes_per_device(state.params)
  opt_bytes = memory.bytes_per_device(state.opt_state)
  return {
    "steps": steps,
    "resumed_from": result["resumed_from"],
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "mesh": dict(run.mesh.shape),
    "config": dataclasses.asdict(config),
    "parameters": sum(
      math.prod(x.shape) for x in jax.tree.leaves(state.params)
    ),
    "losses": result["losses"],
    "valid_losses": result["valid_losses"],
    "final_valid_loss": result["final_valid_loss"],
    "skipped_steps": result["skipped_steps"],
    "skipped_steps_per_process": gather_ints(result["skipped_steps"]),
    "param_checksum": math.fsum(params.values()),
    "param_checksums": params,
    "opt_state_checksums": opt_state,
    "all_finite": bool(
      all(np.isfinite(v) for v in [*params.values(), *opt_state.values()])
    ),
    "param_bytes_per_device": max(param_bytes.values()),
    "opt_state_bytes_per_device": max(opt_bytes.values()),
    "step_time_ms": {
      "median": float(np.median(times) * 1e3) if len(times) else None,
      "q1": float(np.percentile(times, 25) * 1e3) if len(times) else None,
      "q3": float(np.percentile(times, 75) * 1e3) if len(times) else None,
      "first": (
        float(result["step_seconds"][0] * 1e3)
        if result["step_seconds"]
        else None
      ),
    },
  }


def write_metrics(path: str, metrics: dict[str, Any]) -> None:
  """Writes ``metrics`` as JSON to ``path`` (atomically)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  os.replace(path + ".tmp", path)


def log_summary(metrics: dict[str, Any], state: Any, log: Any) -> None:
  """Logs the skipped steps, the model size, the bytes on each of this
  process's devices and the collectives (``--check-collectives``)."""
  if metrics["skipped_steps"]:
    log(
      f"{metrics['skipped_steps']} step(s) skipped in all (non-finite loss "
      "or gradient)"
    )
  log(f"mesh {metrics['mesh']}; parameters {metrics['parameters']}")
  memory.log_memory(state, log)
  for name, found in metrics.get("collectives", {}).items():
    log(f"collectives in the {name.replace('_', ' ')}: {found or 'none'}")
