r"""Sharded Madam in real JAX processes: step time, bytes, collectives.

Trains the Transformer of ``madam_examples.sharded_train`` as ``P``
cooperating JAX processes of ``D`` CPU devices each, for each layout
``P x D`` of :data:`LAYOUTS`, through ``madam_examples.launch_local``
(``jax.distributed`` with a coordinator on 127.0.0.1; the processes'
collectives go over Gloo, on TCP): the code path of a pod or a GPU
cluster, minus the hardware. The mesh is fully sharded (``fsdp`` over every
device), so each device holds ``1 / (P D)`` of the parameters and of the
optimizer state.

Each run writes its ``--metrics-out`` JSON, from which the table takes the
median time of a train step (the steps after the first, each timed to its
end), the bytes of parameters and of optimizer state on each device, the
collectives XLA compiled into the train step and into the optimizer update
alone (``--check-collectives``), and the final validation loss (the same
run in every layout, up to the order of floating-point sums).

On one machine the processes and their simulated devices share its cores,
so the times say what the layouts cost there (communication through the
loopback, processes competing for cores), not how a real cluster scales.

  python benchmarks/multiprocess.py                 # writes results/multiprocess_cpu.*
  python benchmarks/multiprocess.py --quick         # tiny model, prints
  python benchmarks/multiprocess.py --replot        # the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import tempfile
from typing import Any

import _harness as harness

from madam_examples import launch_local

LAYOUTS = ((1, 1), (1, 2), (2, 1), (1, 4), (2, 2), (4, 1))
FULL = dict(steps=30, batch_size=16, context=32, dim=64, heads=4, layers=2)
QUICK = dict(steps=4, batch_size=8, context=16, dim=32, heads=2, layers=1)
LAUNCH_TIMEOUT = 900  # seconds per layout


def parse_layouts(text: str) -> list[tuple[int, int]]:
  """``"1x4,2x2"`` -> ``[(1, 4), (2, 2)]`` (processes x devices each).

  Example:
    >>> parse_layouts("1x4, 2x2")
    [(1, 4), (2, 2)]
  """
  layouts = []
  for item in filter(None, (x.strip() for x in text.split(","))):
    match = re.fullmatch(r"(\d+)x(\d+)", item)
    if not match or min(int(match[1]), int(match[2])) < 1:
      raise argparse.ArgumentTypeError(
        f"layouts are PROCESSESxDEVICES, e.g. 2x2; got {item!r}"
      )
    layouts.append((int(match[1]), int(match[2])))
  return layouts


def train_arguments(
  devices: int, sizes: dict[str, int], metrics: pathlib.Path
) -> list[str]:
  """The ``sharded_train`` arguments of one layout's run."""
  args = [
    "--mesh",
    "fsdp=-1",
    "--simulate-devices",
    str(devices),
    "--log-every",
    str(sizes["steps"]),
    "--check-collectives",
    "--metrics-out",
    str(metrics),
  ]
  for key, value in sizes.items():
    args += ["--" + key.replace("_", "-"), str(value)]
  return args


def _environment() -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = re.sub(
    r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = str(harness.HERE.parent)
  env["PYTHONPATH"] = os.pathsep.join(
    [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  return env


def run_layout(
  processes: int, devices: int, sizes: dict[str, int]
) -> dict[str, Any]:
  """Runs one layout in fresh processes; returns its ``--metrics-out``."""
  with tempfile.TemporaryDirectory(prefix="multiprocess-") as folder:
    folder = pathlib.Path(folder)
    metrics = folder / "metrics.json"
    with open(folder / "process_0.log", "w", encoding="utf-8") as out:
      with launch_local.LocalCluster(
        processes,
        train_arguments(devices, sizes, metrics),
        log_dir=str(folder),
        stdout=out,
        env=_environment(),
      ) as cluster:
        status = cluster.wait(LAUNCH_TIMEOUT)
    if status:
      logs = "\n".join(
        p.read_text()[-2000:] for p in sorted(folder.glob("process_*.log"))
      )
      raise RuntimeError(f"{processes} x {devices}: {cluster.failure}\n{logs}")
    return json.loads(metrics.read_text())


def row(metrics: dict[str, Any]) -> dict[str, Any]:
  """The table's row of one run's metrics."""
  return {
    "processes": metrics["processes"],
    "devices_per_process": metrics["local_devices"],
    "devices": metrics["devices"],
    "mesh": metrics["mesh"],
    "parameters": metrics["parameters"],
    "param_bytes_per_device": metrics["param_bytes_per_device"],
    "opt_state_bytes_per_device": metrics["opt_state_bytes_per_device"],
    "step_time_ms": {
      k: metrics["step_time_ms"][k] for k in ("median", "q1", "q3")
    },
    "collectives_train_step": metrics["collectives"]["train_step"],
    "collectives_optimizer_update": (
      metrics["collectives"]["optimizer_update"]
    ),
    "final_valid_loss": metrics["final_valid_loss"],
    "skipped_steps": metrics["skipped_steps"],
  }


def _kib(x: float) -> str:
  return f"{x / 1024:.1f}"


def markdown_body(results: dict[str, Any]) -> str:
  """The table and notes below the machine record (from the JSON)."""
  s, rows = results["sizes"], results["rows"]
  lines = [
    f"Model: `madam_examples.models.CharTransformer` (dim {s['dim']}, "
    f"{s['layers']} layers, {s['heads']} heads, context {s['context']}), "
    f"{rows[0]['parameters']:,} parameters, global batch "
    f"{s['batch_size']}, {s['steps']} steps; Madam (lr 0.01) with Adam for "
    "the zero-initialised leaves; mesh `fsdp` over every device. Each "
    "layout is a fresh set of processes started by "
    "`madam_examples.launch_local` (CPU devices, collectives over Gloo). "
    "Step time: median (quartiles) of the steps after the first.",
    "",
    "| processes x devices | params / device (KiB) | optimizer state / "
    "device (KiB) | of 1 device | train step ms | collectives in train "
    "step | collectives in optimizer update | final valid loss |",
    "|---|---|---|---|---|---|---|---|",
  ]
  base = (
    rows[0]["param_bytes_per_device"] + rows[0]["opt_state_bytes_per_device"]
  )
  for r in rows:
    total = r["param_bytes_per_device"] + r["opt_state_bytes_per_device"]
    t = r["step_time_ms"]
    lines.append(
      f"| {r['processes']} x {r['devices_per_process']} "
      f"| {_kib(r['param_bytes_per_device'])} "
      f"| {_kib(r['opt_state_bytes_per_device'])} | {total / base:.3f} "
      f"| {t['median']:.1f} ({t['q1']:.1f}-{t['q3']:.1f}) "
      f"| {', '.join(r['collectives_train_step']) or 'none'} "
      f"| {', '.join(r['collectives_optimizer_update']) or 'none'} "
      f"| {r['final_valid_loss']:.6f} |"
    )
  lines += [
    "",
    "Each device holds 1/n of the parameters and of the optimizer state "
    "(plus the replicated per-tensor scalars: step counts and Madam's "
    "magnitude bounds), whether its n devices sit in one process or in "
    "several. The optimizer update compiles to no collective: Madam is "
    "elementwise and its per-tensor bound is fixed at `init`. The train "
    "step holds the gradient reduction (all-reduce), under FSDP the "
    "parameter all-gathers of the forward and backward passes, and the "
    "all-to-alls with which XLA moves activations between sharded "
    "dimensions; across processes they all go over Gloo. The final "
    "validation loss is the same run in every layout, to the order of "
    "floating-point sums.",
    "",
    "These times are not a scaling measurement. The machine has "
    f"{results['machine']['cores']} cores, shared by every process and "
    "simulated device of a run (and, while this ran, by other jobs: see "
    "the load average), so more devices or processes do the same "
    "arithmetic on the same cores, plus the partitioning and the "
    "processes' messages through the loopback. The model is small on "
    "purpose, for such a machine; on real accelerators and networks the "
    "balance of arithmetic and communication is different.",
  ]
  return "\n".join(lines) + "\n"


REPORT = harness.Report(
  "Sharded Madam in several JAX processes: step time, bytes, collectives",
  markdown_body,
)


def parse_args(argv=None) -> argparse.Namespace:
  parser = harness.argument_parser(__doc__, "multiprocess_cpu")
  parser.add_argument(
    "--layouts",
    type=parse_layouts,
    default=list(LAYOUTS),
    help="comma-separated PROCESSESxDEVICES, e.g. 1x4,2x2 (default "
    + ",".join(f"{p}x{d}" for p, d in LAYOUTS)
    + ")",
  )
  return harness.parse_args(parser, argv, __file__)


def main(argv=None, log=harness.progress) -> dict[str, Any]:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  sizes = QUICK if args.quick else FULL
  # No JAX backend in this driver: each layout runs in its own processes.
  results = {
    "machine": harness.machine_record(args.command, devices=False),
    "sizes": sizes,
    "rows": [],
  }
  for processes, devices in args.layouts:
    metrics = run_layout(processes, devices, sizes)
    results["rows"].append(row(metrics))
    r = results["rows"][-1]
    log(
      f"{processes} x {devices}: params+state/device "
      f"{_kib(r['param_bytes_per_device'] + r['opt_state_bytes_per_device'])}"
      f" KiB, step {r['step_time_ms']['median']:.1f} ms, train step "
      f"collectives {r['collectives_train_step'] or 'none'}, update "
      f"collectives {r['collectives_optimizer_update'] or 'none'}"
    )
  most = max(p * d for p, d in args.layouts)
  results["machine"].update(
    backend="cpu",
    devices=f"up to {most} x cpu (simulated), in up to "
    f"{max(p for p, _ in args.layouts)} processes",
  )
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
