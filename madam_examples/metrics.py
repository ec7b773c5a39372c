"""What a ``sharded_train`` run did, as JSON (``--metrics-out``) and logged.

Losses, skipped steps, per-leaf checksums (float64 sums of absolute values,
over all processes) of the parameters and the optimizer state, bytes per
device and step times: runs on different layouts, or resumed ones, can be
compared from outside.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import jax
import numpy as np

from madam_examples import memory
from madam_examples import processes


def leaf_checksums(tree: Any) -> dict[str, float]:
  """Float64 sum of absolute values of each leaf (whole, over processes).

  Each process sums one copy of each shard it holds, and the per-process
  sums are added in process order, so the same layout gives the same bits.
  A collective: every process must call it.

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


def run_metrics(config: Any, result: dict[str, Any]) -> dict[str, Any]:
  """What a run did, JSON-able (a collective: every process calls it).

  ``skipped_steps_per_process``: each process's own count, equal on all
  when the skip decision is global.
  """
  state, skipped = result["state"], result["skipped_steps"]
  params = leaf_checksums(state.params)
  opt_state = leaf_checksums(state.opt_state)
  times = np.asarray(result["step_seconds"][1:] or result["step_seconds"])
  quantiles = [float(np.percentile(times, q) * 1e3) for q in (50, 25, 75)]
  return {
    "steps": result["resumed_from"] + len(result["losses"]),
    "resumed_from": result["resumed_from"],
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "mesh": dict(result["run"].mesh.shape),
    "config": dataclasses.asdict(config),
    "parameters": sum(x.size for x in jax.tree.leaves(state.params)),
    "losses": result["losses"],
    "valid_losses": result["valid_losses"],
    "final_valid_loss": result["final_valid_loss"],
    "skipped_steps": skipped,
    "skipped_steps_per_process": processes.gather(np.array(skipped)).tolist(),
    "param_checksum": math.fsum(params.values()),
    "param_checksums": params,
    "opt_state_checksums": opt_state,
    "all_finite": bool(
      np.isfinite([*params.values(), *opt_state.values()]).all()
    ),
    "param_bytes_per_device": max(
      memory.bytes_per_device(state.params).values()
    ),
    "opt_state_bytes_per_device": max(
      memory.bytes_per_device(state.opt_state).values()
    ),
    "step_time_ms": dict(zip(("median", "q1", "q3"), quantiles))
    if len(times)
    else None,
  }


def write_metrics(path: str, metrics: dict[str, Any]) -> None:
  """Writes ``metrics`` as JSON to ``path`` (atomically)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  os.replace(path + ".tmp", path)


def log_summary(
  metrics: dict[str, Any], state: Any, log: Callable[[str], None]
) -> None:
  """Logs the skipped steps, the model size, the bytes of parameters and
  optimizer state on each of this process's devices, and the collectives
  (``--check-collectives``)."""
  if metrics["skipped_steps"]:
    log(
      f"{metrics['skipped_steps']} step(s) skipped in all (non-finite loss "
      "or gradient)"
    )
  log(f"mesh {metrics['mesh']}; parameters {metrics['parameters']}")
  params = memory.bytes_per_device(state.params)
  opt_state = memory.bytes_per_device(state.opt_state)
  n, where = len(params), f"all {jax.device_count()}"
  if n < jax.device_count():
    where = f"this process's {n} of {jax.device_count()}"
  log(f"memory on {where} devices:")
  for device in sorted(params, key=lambda d: d.id):
    log(
      f"  {device}: params {params[device] / 1024:.1f} KiB, optimizer state "
      f"{opt_state.get(device, 0) / 1024:.1f} KiB"
    )
  for name, found in metrics.get("collectives", {}).items():
    log(f"collectives in the {name.replace('_', ' ')}: {found or 'none'}")
