r"""Per-device memory and step time of sharded Madam on 1, 2, 4, 8 devices.

Trains the Transformer of ``madam_examples.sharded_train``
(``madam_examples.models.CharTransformer``; Madam, with Adam for the
zero-initialised leaves) on a mesh of ``n`` devices, in two layouts:

* ``fsdp``: parameters and optimizer state split ``n`` ways (``fsdp=n``);
* ``data``: plain data parallelism, parameters and state replicated
  (``data=n``), for contrast.

For each it records the bytes of parameters and of optimizer state held by
each device, XLA's per-device temporary buffer size for the train step, the
median time of the train step and of the optimizer update alone, and the
collectives XLA compiled into each.

On a CPU host the devices are simulated: each ``n`` runs in its own
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` set
before JAX starts (the device count is fixed when JAX's backend starts).
Simulated devices share the same CPU cores, so step time does not fall with
``n`` here; the memory figures are what a real mesh would hold. On a GPU host
or TPU VM pass ``--platform gpu`` / ``--platform tpu`` to use the real
devices (``n`` up to their number).

  python benchmarks/scaling.py                       # writes results/scaling_cpu.*
  python benchmarks/scaling.py --quick               # tiny model, prints
  python benchmarks/scaling.py --replot              # the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any

import _harness as harness

DEVICE_COUNTS = (1, 2, 4, 8)
FULL = dict(steps=12, batch_size=32, context=64, dim=128, heads=4, layers=2)
QUICK = dict(steps=3, batch_size=8, context=16, dim=32, heads=2, layers=1)
WARMUP = 2


# ------------------------------------------------------------ one process


def measure(
  layout: str, n: int, sizes: dict[str, int], devices: list[Any] | None = None
) -> dict[str, Any]:
  """Builds a run on ``n`` devices in ``layout`` and measures it."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from madam_examples import data  # pylint: disable=import-outside-toplevel
  from madam_examples import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from madam_examples import sharded_train as st  # pylint: disable=import-outside-toplevel

  devices = list(jax.devices() if devices is None else devices)[:n]
  config = st.Config(
    mesh=f"{layout}={n}",
    seed=0,
    **{k: v for k, v in sizes.items() if k != "steps"},
  )
  run = st.setup(config, devices)
  params = run.state.params
  param_bytes = harness.bytes_per_device(params)
  opt_bytes = harness.bytes_per_device(run.state.opt_state)
  tokens = data.load_stdlib_text().train

  def batch(step):
    return mesh_lib.device_batch(
      st.global_batch_rows(
        tokens, step, config.batch_size, config.context, config.seed
      ),
      run.batch_sharding,
    )

  compiled = run.train_step.lower(run.state, batch(0)).compile()
  memory = compiled.memory_analysis()
  update_compiled = st.optimizer_update(run).lower(run.state, params).compile()

  state, times = run.state, []
  for step in range(WARMUP + sizes["steps"]):
    b = batch(step)
    jax.block_until_ready(b)
    start = time.perf_counter()
    state, loss, _ = compiled(state, b)  # the executable compiled above
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  update_times = []
  grads = state.params
  for _ in range(WARMUP + sizes["steps"]):
    start = time.perf_counter()
    state = jax.block_until_ready(update_compiled(state, grads))
    update_times.append(time.perf_counter() - start)

  def stats(xs):
    q1, med, q3 = harness.quartiles(np.asarray(xs[WARMUP:]) * 1e3)
    return {
      "median_ms": round(med, 3),
      "q1_ms": round(q1, 3),
      "q3_ms": round(q3, 3),
    }

  return {
    "layout": layout,
    "devices": n,
    "mesh": dict(run.mesh.shape),
    "parameters": harness.param_count(params),
    "param_bytes_total": harness.tree_bytes(params),
    "opt_state_bytes_total": harness.tree_bytes(run.state.opt_state),
    "param_bytes_per_device": max(param_bytes.values()),
    "opt_state_bytes_per_device": max(opt_bytes.values()),
    "train_step_temp_bytes_per_device": (
      int(memory.temp_size_in_bytes) if memory is not None else None
    ),
    "train_step": stats(times),
    "optimizer_update": stats(update_times),
    "collectives_train_step": mesh_lib.collectives_in_hlo(compiled.as_text()),
    "collectives_optimizer_update": mesh_lib.collectives_in_hlo(
      update_compiled.as_text()
    ),
    "final_loss": float(loss),
  }


def worker(args: argparse.Namespace) -> None:
  """Subprocess entry: measures every layout for one device count."""
  import jax  # pylint: disable=import-outside-toplevel

  if jax.device_count() < args.worker:
    raise SystemExit(
      f"worker for {args.worker} devices sees only {jax.device_count()}"
    )
  sizes = QUICK if args.quick else FULL
  layouts = ["fsdp"] if args.worker == 1 else ["fsdp", "data"]
  rows = [measure(layout, args.worker, sizes) for layout in layouts]
  harness.progress(
    "RESULT " + json.dumps({"devices": harness.device_summary(), "rows": rows})
  )


# ---------------------------------------------------------------- driver


def run_worker(n: int, platform_name: str, quick: bool) -> dict[str, Any]:
  """Measures ``n`` devices in a fresh process: ``{"devices", "rows"}``."""
  env = dict(os.environ)
  flags = re.sub(
    r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
  )
  if platform_name == "cpu":
    flags += f" --xla_force_host_platform_device_count={n}"
  env["XLA_FLAGS"] = flags.strip()
  env["JAX_PLATFORMS"] = platform_name
  cmd = [
    sys.executable,
    str(pathlib.Path(__file__).resolve()),
    "--worker",
    str(n),
  ] + (["--quick"] if quick else [])
  out = subprocess.run(
    cmd, env=env, capture_output=True, text=True, check=False
  )
  if out.returncode:
    raise RuntimeError(f"worker for {n} devices failed:\n{out.stderr[-3000:]}")
  return worker_result(out.stdout)


def worker_result(stdout: str) -> dict[str, Any]:
  """The ``RESULT`` line a worker printed, decoded."""
  line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line[len("RESULT ") :])


def _kib(x):
  return "-" if x is None else f"{x / 1024:.1f}"


def markdown_body(results: dict[str, Any]) -> str:
  """The table and notes below the machine record (from the JSON)."""
  s = results["sizes"]
  simulated = results["platform"] == "cpu"
  lines = [
    f"Devices: {results['platform']}"
    f"{' (simulated: they share the cores above)' if simulated else ''}.",
    "",
    f"Model: `madam_examples.models.CharTransformer` (dim {s['dim']}, "
    f"{s['layers']} layers, {s['heads']} heads, context {s['context']}), "
    f"{results['rows'][0]['parameters']:,} parameters, global batch "
    f"{s['batch_size']}; Madam (lr 0.01) with Adam for the zero-initialised "
    f"leaves. Times: median (quartiles) of {s['steps']} steps after "
    f"{WARMUP} warm-up steps.",
    "",
    "| devices | layout | params / device (KiB) | optimizer state / device "
    "(KiB) | of 1 device | XLA temp / device (KiB) | train step ms | "
    "optimizer update ms | collectives in train step | collectives in "
    "optimizer update |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  base = results["rows"][0]
  base_total = (
    base["param_bytes_per_device"] + base["opt_state_bytes_per_device"]
  )
  for r in results["rows"]:
    total = r["param_bytes_per_device"] + r["opt_state_bytes_per_device"]
    t, u = r["train_step"], r["optimizer_update"]
    lines.append(
      f"| {r['devices']} | {r['layout']} | {_kib(r['param_bytes_per_device'])}"
      f" | {_kib(r['opt_state_bytes_per_device'])} | {total / base_total:.3f}"
      f" | {_kib(r['train_step_temp_bytes_per_device'])}"
      f" | {t['median_ms']:.1f} ({t['q1_ms']:.1f}-{t['q3_ms']:.1f})"
      f" | {u['median_ms']:.2f} ({u['q1_ms']:.2f}-{u['q3_ms']:.2f})"
      f" | {', '.join(r['collectives_train_step']) or 'none'}"
      f" | {', '.join(r['collectives_optimizer_update']) or 'none'} |"
    )
  lines += [
    "",
    "With `fsdp` each device holds 1/n of the parameters and of the "
    "optimizer state (plus the replicated per-tensor scalars: step counts "
    "and Madam's magnitude bounds); with `data` each holds all of it. The "
    "optimizer update compiles to no collective in either layout: Madam is "
    "elementwise and its per-tensor bound is fixed at `init`. The train "
    "step's collectives are the gradient reduction and, under FSDP, the "
    "parameter all-gathers of the forward and backward passes.",
  ]
  if results["platform"] == "cpu":
    lines += [
      "",
      "These times are not a scaling measurement. Simulated CPU devices "
      "share the host's cores: n devices do the same arithmetic on the same "
      "cores, plus partitioning and copying between them. One simulated "
      "device may keep fewer cores busy than several do, and XLA's CPU "
      "threading differs with n, so times can fall with n for reasons "
      "that have nothing to do with sharding; the optimizer update (a few "
      "milliseconds of "
      "elementwise work split into many small per-device pieces) mostly "
      "measures dispatch overhead, and under `data` every device repeats "
      "the whole update on its replica (n times the arithmetic on the same "
      "cores). The machine was shared with other jobs "
      "while this ran, so times are noisy. XLA's temporary memory per "
      "device falls with n in both layouts because each device processes "
      "1/n of the batch.",
    ]
  return "\n".join(lines) + "\n"


REPORT = harness.Report(
  "Sharded Madam: per-device memory and step time", markdown_body
)


def parse_args(argv=None) -> argparse.Namespace:
  parser = harness.argument_parser(__doc__, name=None)
  parser.add_argument(
    "--devices",
    default=",".join(map(str, DEVICE_COUNTS)),
    help="comma-separated device counts",
  )
  parser.add_argument(
    "--platform",
    default="cpu",
    help="cpu (simulated devices), gpu or tpu; the results' "
    "default name is scaling_<platform>",
  )
  parser.add_argument(
    "--worker", type=int, default=None, help=argparse.SUPPRESS
  )
  args = harness.parse_args(parser, argv, __file__)
  args.name = args.name or f"scaling_{args.platform}"
  return args


def main(argv=None, log=harness.progress) -> dict[str, Any]:
  args = parse_args(argv)
  if args.worker:
    worker(args)
    return {}
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  # No JAX backend in this driver: the workers choose the device count.
  results = {
    "machine": harness.machine_record(args.command, devices=False),
    "platform": args.platform,
    "sizes": QUICK if args.quick else FULL,
    "rows": [],
  }
  for n in (int(x) for x in args.devices.split(",")):
    measured = run_worker(n, args.platform, args.quick)
    results["machine"].update(measured["devices"])  # the largest mesh's
    for r in measured["rows"]:
      log(
        f"{n} device(s), {r['layout']}: params+state/device "
        f"{(r['param_bytes_per_device'] + r['opt_state_bytes_per_device']) / 1024:.1f} KiB, "
        f"step {r['train_step']['median_ms']:.1f} ms, update "
        f"{r['optimizer_update']['median_ms']:.2f} ms, update collectives "
        f"{r['collectives_optimizer_update'] or 'none'}"
      )
    results["rows"] += measured["rows"]
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
