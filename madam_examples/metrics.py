"""What a ``sharded_train`` run did: as JSON (``--metrics-out``), and logged.

Losses, skipped steps, bytes per device and step times, so that runs on
different layouts, or resumed ones, can be compared from outside (their
parameters: from the last checkpoint, ``--checkpoint-dir``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np

from madam_examples import memory
from madam_examples import processes


def run_metrics(config: Any, result: dict[str, Any]) -> dict[str, Any]:
  """What a run did, JSON-able (a collective: every process calls it).

  ``skipped_steps_per_process``: each process's own count, equal on all
  when the skip decision is global.
  """
  state, skipped = result["state"], result["skipped_steps"]
  times = np.asarray(result["step_seconds"][1:] or result["step_seconds"])
  step_ms = None
  if len(times):
    step_ms = {k: float(np.percentile(times, q) * 1e3)
               for k, q in (("median", 50), ("q1", 25), ("q3", 75))}  # fmt: skip
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
    "skipped_steps_per_process": processes.gather(skipped).tolist(),
    "param_bytes_per_device": max(
      memory.bytes_per_device(state.params).values()
    ),
    "opt_state_bytes_per_device": max(
      memory.bytes_per_device(state.opt_state).values()
    ),
    "step_time_ms": step_ms,
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
