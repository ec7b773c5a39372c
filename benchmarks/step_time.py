"""Step time, bandwidth floor, compile time and state memory of Madam vs Optax.

Times the jitted update-and-apply step (``tx.update`` then
``optax.apply_updates``, params and optimizer state donated as in a real
training step) of ``madam_optax.madam`` (float32 and bfloat16 second moment),
``optax.adam``, ``optax.sgd``, ``optax.lion`` and ``optax.fromage`` (and
``madam_optax.lns_madam`` when the package has it) on parameter trees shaped
like real models (an MLP, ResNet-50, GPT-2 small) and on flat one-leaf trees.

Within one tree, every optimizer and two bandwidth kernels are timed
interleaved (round robin, a different starting point each round) after a
warm-up, so that load from other processes hits them all alike; the table
reports medians and inter-quartile ranges. Ratios to ``optax.adam`` are
medians of paired ratios: each round's sample divided by Adam's sample of the
same round, which cancels much of the load of a shared machine; the same for
``lns_madam`` against ``lns_madam_nearest``, and for compile times (each
fresh compilation against Adam's of the same repeat). Beside wall time, each
sample records the process's CPU time (all threads), whose paired ratios are
steadier still when other processes compete for the cores. Rounds alternate
their direction, so no optimizer always follows the same one. The machine's
streaming bandwidth is measured in the same rounds by two jitted, donated kernels on a buffer far
larger than the caches: ``x + 1`` (reads 4 and writes 4 bytes per element) and
``a * s + b`` (reads 8, writes 4). Each optimizer's *floor* is the bytes it
must move per step divided by the faster of the two bandwidths; the bytes per
parameter are (float32 unless stated):

* madam: reads w, g, rms_hat; writes w, rms_hat: 5 x 4 = 20 (bf16 rms_hat: 16). As
  XLA:CPU compiles it (no multi-output fusion), one loop writes the new rms_hat
  and a second reads it back with w and g: 28.
* adam: reads w, g, mu, nu; writes w, mu, nu: 7 x 4 = 28.
* sgd (no momentum): reads w, g; writes w: 3 x 4 = 12.
* lion: reads w, g, mu; writes w, mu: 5 x 4 = 20.
* fromage: the per-tensor norms of w and g need a pass over both before the
  update can start, then reads w, g and writes w: 2 x 8 + 4 = 20.
* madam_b1 (``madam(b1=0.9)``): reads w, g, mu, rms_hat; writes w, mu, rms_hat:
  7 x 4 = 28, Adam's bytes.
* lns_madam: integer codes (1 or 2 bytes) read and written, g read, rms_hat read
  and written, from the actual dtypes (``lns_madam`` with its default
  stochastic rounding from hashed random bits, ``lns_madam_nearest`` with
  nearest rounding).

Five more run only when named in ``--optimizers``: ``madam_b1``
(``madam(b1=0.9)``, Madam with Adam's first moment), ``madam_chain`` (the
chain of Madam's four parts, which ``madam()`` computes in one pass per
tensor), ``madam_parts_bound`` (``madam()`` with its step and bound as the two
parts' own functions rather than their composition on magnitudes, the same
bits), ``lns_madam_threefry`` (stochastic rounding from ``jax.random``'s
threefry bits instead of hashed ones) and ``rmsprop`` (``optax.rmsprop``:
Madam's one full-size buffer and its two loops per tensor, 28 bytes per
parameter as compiled, with little arithmetic; what Madam's traffic alone
costs on the machine).

The goals table checks the paired ratios against :data:`GOALS`.

Compile time is the wall time of ``jit(step).lower(...).compile()`` (median of
fresh compilations). Optimizer-state bytes per parameter are summed from the
actual state arrays.

Usage::

  python benchmarks/step_time.py                 # full run, writes results/
  python benchmarks/step_time.py --quick         # tiny smoke run, prints
  python benchmarks/step_time.py --sizes 1,10 --trees mlp --repeats 15
  python benchmarks/step_time.py --replot        # the table from the JSON

Reference for Madam: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import madam_optax
from madam_optax._src import fused_madam

F32 = 4

# --------------------------------------------------------------------------
# Parameter trees shaped like real models.


def mlp_shapes(dims=(784, 2048, 2048, 2048, 10)) -> dict[str, tuple]:
  """A plain MLP: a kernel and a bias per layer (about 10.4M parameters)."""
  shapes = {}
  for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
    shapes[f"dense{i}/kernel"] = (a, b)
    shapes[f"dense{i}/bias"] = (b,)
  return shapes


def resnet50_shapes() -> dict[str, tuple]:
  """ResNet-50's layers (HWIO kernels, batch-norm scale and bias): 25.6M."""
  shapes = {
    "stem/conv": (7, 7, 3, 64),
    "stem/bn/scale": (64,),
    "stem/bn/bias": (64,),
  }
  c_in = 64
  for stage, (blocks, width) in enumerate(
    zip((3, 4, 6, 3), (64, 128, 256, 512))
  ):
    for block in range(blocks):
      name = f"stage{stage}/block{block}"
      layers = [
        ("conv1", (1, 1, c_in, width)),
        ("conv2", (3, 3, width, width)),
        ("conv3", (1, 1, width, 4 * width)),
      ]
      if block == 0:
        layers.append(("proj", (1, 1, c_in, 4 * width)))
      for lname, shape in layers:
        shapes[f"{name}/{lname}"] = shape
        shapes[f"{name}/{lname}_bn/scale"] = (shape[-1],)
        shapes[f"{name}/{lname}_bn/bias"] = (shape[-1],)
      c_in = 4 * width
  shapes["fc/kernel"] = (2048, 1000)
  shapes["fc/bias"] = (1000,)
  return shapes


def gpt2_small_shapes(vocab=50257, ctx=1024, d=768, layers=12) -> dict:
  """GPT-2 small's layers (tied embedding, 12 blocks): 124.4M parameters."""
  shapes = {"wte": (vocab, d), "wpe": (ctx, d)}
  for i in range(layers):
    b = f"h{i}"
    shapes.update(
      {
        f"{b}/ln_1/scale": (d,),
        f"{b}/ln_1/bias": (d,),
        f"{b}/attn/c_attn/kernel": (d, 3 * d),
        f"{b}/attn/c_attn/bias": (3 * d,),
        f"{b}/attn/c_proj/kernel": (d, d),
        f"{b}/attn/c_proj/bias": (d,),
        f"{b}/ln_2/scale": (d,),
        f"{b}/ln_2/bias": (d,),
        f"{b}/mlp/c_fc/kernel": (d, 4 * d),
        f"{b}/mlp/c_fc/bias": (4 * d,),
        f"{b}/mlp/c_proj/kernel": (4 * d, d),
        f"{b}/mlp/c_proj/bias": (d,),
      }
    )
  shapes.update({"ln_f/scale": (d,), "ln_f/bias": (d,)})
  return shapes


def flat_shapes(n: int) -> dict[str, tuple]:
  """One flat leaf of ``n`` parameters."""
  return {"w": (n,)}


TREES: dict[str, Callable[[], dict]] = {
  "mlp": mlp_shapes,
  "resnet50": resnet50_shapes,
  "gpt2_small": gpt2_small_shapes,
}


def random_tree(shapes: dict[str, tuple], seed: int, scale=0.02) -> dict:
  """Nonzero float32 leaves (Madam cannot move exact zeros)."""
  key = jax.random.key(seed)
  out = {}
  for i, (name, shape) in enumerate(sorted(shapes.items())):
    out[name] = scale * jax.random.normal(jax.random.fold_in(key, i), shape)
  return jax.block_until_ready(out)


# --------------------------------------------------------------------------
# Optimizers and the bytes each must move per parameter.


def optimizers() -> dict[str, Callable[[], optax.GradientTransformation]]:
  """Name -> factory of each optimizer benchmarked (all float32 params)."""
  opts = {
    "madam": lambda: madam_optax.madam(),
    "madam_bf16": lambda: madam_optax.madam(state_dtype=jnp.bfloat16),
    "adam": lambda: optax.adam(1e-3),
    "sgd": lambda: optax.sgd(1e-2),
    "lion": lambda: optax.lion(1e-4),
    "fromage": lambda: optax.fromage(1e-2),
  }
  if hasattr(madam_optax, "lns_madam"):
    # Stochastic rounding (the default) hashes random bits per weight;
    # nearest rounding shows the cost of the LNS step without them.
    opts["lns_madam"] = lambda: madam_optax.lns_madam(_lns_format())
    opts["lns_madam_nearest"] = lambda: madam_optax.lns_madam(
      _lns_format(), rounding="nearest"
    )
  return opts


def optional_optimizers() -> dict[
  str, Callable[[], optax.GradientTransformation]
]:
  """Optimizers timed only when ``--optimizers`` names them.

  Madam with a first moment (``b1=0.9``); Madam as the chain of its four
  parts (``madam()`` computes the same in one
  pass per tensor); ``madam()`` with the step and the bound as the two
  parts' own functions instead of their composition on magnitudes (the same
  bits; the lever measured side by side); ``lns_madam`` with threefry
  random bits; and ``optax.rmsprop``, which keeps Madam's one full-size
  buffer and moves its bytes in the same two loops per tensor (the new
  second moment, then the weights), with little arithmetic: the step time
  Madam's traffic takes on the machine.
  """
  return {
    "madam_b1": lambda: madam_optax.madam(b1=0.9),
    "rmsprop": lambda: optax.rmsprop(1e-3),
    "madam_parts_bound": lambda: fused_madam.fused_madam(on_magnitudes=False),
    "madam_chain": lambda: optax.chain(
      madam_optax.scale_by_second_moment(0.999),
      optax.clip(10.0),
      madam_optax.multiplicative_step(0.01),
      madam_optax.clip_weight_magnitude(3.0),
    ),
    "lns_madam_threefry": lambda: madam_optax.lns_madam(
      _lns_format(), rng="threefry"
    ),
  }


def _lns_format():
  return madam_optax.LNSFormat.spanning(127)  # int8 codes


def param_encoders() -> dict[str, Callable[[Any], Any]]:
  """Optimizers whose params are not the float32 weights: name -> encoder."""
  if not hasattr(madam_optax, "lns_madam"):
    return {}
  encode = lambda p: madam_optax.lns_encode_tree(p, _lns_format())[0]
  return {
    "lns_madam": encode,
    "lns_madam_nearest": encode,
    "lns_madam_threefry": encode,
  }


def bytes_per_param(
  name: str, state_bytes_per_param: float, param_bytes: float = F32
) -> float:
  """Bytes an optimizer must move per parameter per step (module docstring).

  ``state_bytes_per_param``: its full-size state buffers' bytes per param.
  """
  w, g = param_bytes, F32
  if name in (
    "madam",
    "madam_b1",
    "madam_bf16",
    "madam_chain",
    "madam_parts_bound",
    "rmsprop",
    "lns_madam",
    "lns_madam_nearest",
    "lns_madam_threefry",
  ):
    # rms (and madam_b1's mu): the full-size state buffers (read + written).
    rms = state_bytes_per_param
    return w + g + rms + w + rms
  if name == "adam":
    return w + g + 2 * F32 + w + 2 * F32
  if name == "sgd":
    return w + g + w
  if name == "lion":
    return w + g + F32 + w + F32
  if name == "fromage":
    return 2 * (w + g) + w
  raise ValueError(f"no byte accounting for optimizer {name!r}")


def full_buffer_bytes(state: Any, params: Any) -> int:
  """Bytes in state leaves that are as large as some parameter leaf (>1 elt)."""
  sizes = {int(np.size(p)) for p in jax.tree.leaves(params) if np.size(p) > 1}
  return harness.tree_bytes(state, where=lambda x: int(np.size(x)) in sizes)


# --------------------------------------------------------------------------
# Steps, compilation, HLO statistics.


def make_step(tx: optax.GradientTransformation):
  """The jitted step ``(params, state, grads) -> (params, state)``, donated."""

  def step(params, state, grads):
    return harness.update_and_apply(tx, grads, state, params)

  return jax.jit(step, donate_argnums=(0, 1))


def count_fusions(hlo_text: str) -> int:
  """Number of fused kernels launched by the entry computation."""
  entry = hlo_text[hlo_text.find("ENTRY") :]
  return sum(
    1 for line in entry.splitlines() if " fusion(" in line or "= fusion" in line
  )


def compile_step(make_tx, params_spec, grads_spec):
  """Compiles a fresh step; returns (compiled, lower seconds, compile seconds)."""
  tx = make_tx()
  state_spec = jax.eval_shape(tx.init, params_spec)
  t0 = time.perf_counter()
  lowered = make_step(tx).lower(params_spec, state_spec, grads_spec)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


def bandwidth_kernels(n: int):
  """Two donated streaming kernels on ``n`` float32s: (name, fn, args, bytes)."""
  copy = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  triad = jax.jit(lambda a, b: a * 0.5 + b, donate_argnums=0)
  x = jnp.ones((n,), jnp.float32)
  a = jnp.ones((n,), jnp.float32)
  b = jnp.full((n,), 0.5, jnp.float32)
  return [("copy", copy, [x], 8 * n), ("triad", triad, [a, b], 12 * n)]


# --------------------------------------------------------------------------
# The measurement.


def paired_ratio(samples: list[float], reference: list[float]) -> float:
  """Median of the per-round ratios ``samples[i] / reference[i]``.

  Example:
    >>> paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 2.0])
    2.0
  """
  return statistics.median(a / b for a, b in zip(samples, reference))


def bench_tree(
  tree_name: str,
  shapes: dict,
  *,
  repeats: int,
  compile_repeats: int,
  bw_n: int,
  target_s: float,
  opt_names=None,
  skipped=None,
  log=harness.progress,
) -> dict:
  """Measures every optimizer (and bandwidth) on one tree, interleaved."""
  skipped = [] if skipped is None else skipped
  params0 = random_tree(shapes, seed=0)
  g = random_tree(shapes, seed=1, scale=1e-3)
  # Alternate g and -g so that weights oscillate instead of drifting.
  grads = [g, jax.tree.map(jnp.negative, g)]
  n_params = harness.param_count(params0)
  n_leaves = harness.array_count(params0)
  g_spec = jax.eval_shape(lambda: params0)
  all_opts = optimizers()
  if opt_names:
    all_opts.update(optional_optimizers())
  encoders = param_encoders()
  names = [n for n in (opt_names or all_opts) if n in all_opts]
  start = {}
  for n in list(names):
    try:
      start[n] = encoders[n](params0) if n in encoders else params0
    except Exception as e:  # pylint: disable=broad-except
      # Optional variants still in development must not sink the run.
      log(f"  skipping {n}: {type(e).__name__}: {e}")
      skipped.append(f"{n} on {tree_name} ({type(e).__name__}: {e})")
      names.remove(n)
  log(f"[{tree_name}] {n_params / 1e6:.2f}M params, {n_leaves} leaves")

  # Compile times: fresh compilations, interleaved across optimizers.
  lower_s = {n: [] for n in names}
  compile_s = {n: [] for n in names}
  compiled = {}
  for _ in range(compile_repeats):
    for n in names:
      p_spec = jax.eval_shape(lambda n=n: start[n])
      c, lo, co = compile_step(all_opts[n], p_spec, g_spec)
      lower_s[n].append(lo)
      compile_s[n].append(co)
      compiled[n] = c
  fusions = {n: count_fusions(compiled[n].as_text()) for n in names}

  # Live buffers: one params copy and one state per optimizer (donated).
  live = {}
  for n in names:
    tx = all_opts[n]()
    params = jax.tree.map(jnp.copy, start[n])
    state = tx.init(params)
    live[n] = dict(
      params=params,
      state=state,
      state_bytes=harness.tree_bytes(state),
      param_bytes=harness.tree_bytes(params) / n_params,
      state_leaves=harness.array_count(state),
      state_full_bytes=full_buffer_bytes(state, params),
    )
  del params0, start

  kernels = bandwidth_kernels(bw_n)
  bw_live = {k[0]: list(k[2]) for k in kernels}

  def run_opt(n, k):
    d = live[n]
    for i in range(k):
      d["params"], d["state"] = compiled[n](
        d["params"], d["state"], grads[i % 2]
      )
    jax.block_until_ready(d["params"])

  def run_bw(kname, fn, k):
    args = bw_live[kname]
    for _ in range(k):
      args[0] = fn(*args)
    jax.block_until_ready(args[0])

  tasks = [(n, lambda k, n=n: run_opt(n, k)) for n in names]
  tasks += [
    (f"bw_{kn}", lambda k, kn=kn, fn=fn: run_bw(kn, fn, k))
    for kn, fn, _, _ in kernels
  ]

  # Warm-up (excluded), then calls per sample so one sample is >= target_s.
  inner = {}
  for tname, fn in tasks:
    fn(2)
    t0 = time.perf_counter()
    fn(1)
    dt = max(time.perf_counter() - t0, 1e-6)
    inner[tname] = int(min(50, max(1, round(target_s / dt))))
  samples: dict[str, list[float]] = {tname: [] for tname, _ in tasks}
  cpu: dict[str, list[float]] = {tname: [] for tname, _ in tasks}
  for r in range(repeats):
    order = tasks[r % len(tasks) :] + tasks[: r % len(tasks)]
    if r % 2:
      order = order[::-1]
    for tname, fn in order:
      k = inner[tname]
      t0, c0 = time.perf_counter(), time.process_time()
      fn(k)
      samples[tname].append((time.perf_counter() - t0) / k)
      cpu[tname].append((time.process_time() - c0) / k)

  bw = {}
  for kn, _, _, nbytes in kernels:
    q1, med, q3 = harness.quartiles(samples[f"bw_{kn}"])
    bw[kn] = dict(
      gbps=nbytes / med / 1e9,
      ms=med * 1e3,
      iqr_ms=(q3 - q1) * 1e3,
      bytes=nbytes,
    )
  best_bw = max(v["gbps"] for v in bw.values()) * 1e9

  rows = []
  for n in names:
    q1, med, q3 = harness.quartiles(samples[n])
    d = live[n]
    full_bpp = d["state_full_bytes"] / n_params
    moved = bytes_per_param(n, full_bpp, d["param_bytes"])
    floor = moved * n_params / best_bw
    rows.append(
      dict(
        tree=tree_name,
        params=n_params,
        leaves=n_leaves,
        optimizer=n,
        step_ms=med * 1e3,
        iqr_ms=(q3 - q1) * 1e3,
        samples=len(samples[n]),
        calls_per_sample=inner[n],
        bytes_per_param_moved=moved,
        floor_ms=floor * 1e3,
        x_floor=med / floor,
        lower_s=statistics.median(lower_s[n]),
        compile_s=statistics.median(compile_s[n]),
        fusions=fusions[n],
        state_bytes=d["state_bytes"],
        state_leaves=d["state_leaves"],
        state_bytes_per_param=d["state_bytes"] / n_params,
        state_full_bytes_per_param=full_bpp,
      )
    )
  ref = {r["optimizer"]: r for r in rows}.get("adam")
  total = {
    m: [lo + co for lo, co in zip(lower_s[m], compile_s[m])] for m in names
  }

  def paired(measured, n, other):
    return (
      paired_ratio(measured[n], measured[other]) if other in measured else None
    )

  for r in rows:
    n = r["optimizer"]
    r["x_adam_step"] = r["step_ms"] / ref["step_ms"] if ref else None
    r["x_adam_compile"] = (
      (r["lower_s"] + r["compile_s"]) / (ref["lower_s"] + ref["compile_s"])
      if ref
      else None
    )
    r["cpu_ms"] = statistics.median(cpu[n]) * 1e3
    r["x_adam_paired"] = paired(samples, n, "adam")
    r["x_adam_paired_cpu"] = paired(cpu, n, "adam")
    r["x_adam_compile_paired"] = paired(total, n, "adam")
    if n.startswith("lns_madam") and n != "lns_madam_nearest":
      r["x_nearest_paired"] = paired(samples, n, "lns_madam_nearest")
      r["x_nearest_paired_cpu"] = paired(cpu, n, "lns_madam_nearest")
  for r in rows:
    log(
      f"  {r['optimizer']:>11s} {r['step_ms']:9.3f} ms (IQR {r['iqr_ms']:.3f})"
      f"  x_floor {r['x_floor']:.2f}  compile {r['compile_s']:.2f}s"
      f"  state {r['state_bytes_per_param']:.3f} B/param"
    )
  log(
    f"  bandwidth: copy {bw['copy']['gbps']:.2f} GB/s, "
    f"triad {bw['triad']['gbps']:.2f} GB/s"
  )
  return dict(
    tree=tree_name, params=n_params, leaves=n_leaves, rows=rows, bandwidth=bw
  )


# --------------------------------------------------------------------------
# Report.


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


# The issue's goals on this CPU, as medians of paired ratios: (row
# optimizer, ratio key, bound, which trees, description).
GOALS = (
  ("madam", "x_adam_paired", 0.80, "10M+", "madam / adam"),
  ("lns_madam", "x_adam_paired", 1.0, "10M+", "lns_madam / adam"),
  ("lns_madam", "x_nearest_paired", 1.25, "10M+", "lns_madam / nearest"),
  ("madam", "x_adam_compile_paired", 1.2, "many-leaf", "compile madam / adam"),
)
BIG_TREE = 10_000_000  # "10M+": trees of at least this many parameters
MANY_LEAVES = 100  # "many-leaf": trees of at least this many leaves


def _goal_applies(tree: dict, which: str) -> bool:
  if which == "10M+":
    return tree["params"] >= BIG_TREE
  return tree["leaves"] >= MANY_LEAVES


def goal_rows(results: dict) -> list[dict]:
  """Each goal on each tree it applies to: the ratio, its bound, met or not.

  Example:
    >>> tree = {"tree": "t", "params": 2e7, "leaves": 1, "rows": [
    ...     {"optimizer": "madam", "x_adam_paired": 0.9}]}
    >>> [(g["goal"], g["ratio"], g["met"]) for g in goal_rows(
    ...     {"trees": [tree]})]
    [('madam / adam', 0.9, False)]
  """
  out = []
  for tr in results["trees"]:
    rows = {r["optimizer"]: r for r in tr["rows"]}
    for opt, key, bound, which, goal in GOALS:
      ratio = rows.get(opt, {}).get(key)
      if ratio is None or not _goal_applies(tr, which):
        continue
      out.append(
        dict(
          tree=tr["tree"],
          goal=goal,
          ratio=ratio,
          cpu_ratio=rows[opt].get(key + "_cpu"),
          bound=bound,
          met=ratio <= bound,
          miss=ratio / bound - 1.0,
        )
      )
  return out


def goals_table(results: dict) -> list[str]:
  """Markdown lines: the paired ratios the performance goals are about."""
  lines = [
    "Paired ratios (median over rounds of each round's ratio; wall time, "
    "and CPU time in brackets). Goals on trees of 10M+ parameters: madam / "
    "adam <= 0.80, lns_madam (stochastic, int8) / adam <= 1.0, lns_madam / "
    "lns_madam_nearest <= 1.25; compile (lowering + XLA) madam / adam <= 1.2 "
    f"on the many-leaf trees ({MANY_LEAVES}+ leaves).",
    "",
    "| tree | params | leaves | madam / adam | lns_madam / adam | "
    "lns_madam / nearest | compile madam / adam |",
    "|---|---|---|---|---|---|---|",
  ]

  def pair(row, key):
    if row is None or row.get(key) is None:
      return "-"
    cpu = row.get(key + "_cpu")
    return f"{row[key]:.2f}" + (f" ({cpu:.2f})" if cpu is not None else "")

  for tr in results["trees"]:
    rows = {r["optimizer"]: r for r in tr["rows"]}
    madam, lns = rows.get("madam"), rows.get("lns_madam")
    compile_ratio = (madam or {}).get("x_adam_compile_paired")
    lines.append(
      f"| {tr['tree']} | {tr['params'] / 1e6:.1f}M | {tr['leaves']} | "
      f"{pair(madam, 'x_adam_paired')} | {pair(lns, 'x_adam_paired')} | "
      f"{pair(lns, 'x_nearest_paired')} | {_fmt(compile_ratio, '.2f')} |"
    )
  goals = goal_rows(results)
  if goals:
    lines += [
      "",
      "| goal | tree | ratio | bound | met | miss |",
      "|---|---|---|---|---|---|",
    ]
    for g in goals:
      miss = "-" if g["met"] else f"+{100 * g['miss']:.0f}%"
      lines.append(
        f"| {g['goal']} | {g['tree']} | {g['ratio']:.2f} | "
        f"<= {g['bound']:g} | {'yes' if g['met'] else 'no'} | {miss} |"
      )
  return lines + [""]


def markdown_body(results: dict) -> str:
  """The tables below the machine record (from the JSON's contents)."""
  lines = [
    f"{results['repeats']} interleaved rounds per tree after warm-up; "
    "step = `tx.update` + `optax.apply_updates`, params and state donated.",
    "",
  ]
  if any("x_adam_paired" in r for tr in results["trees"] for r in tr["rows"]):
    lines += goals_table(results)
  lines += [
    "Columns: median step time and its inter-quartile range; the ratio to "
    "`optax.adam` on the same tree, as the median of paired per-round "
    "ratios of wall time and of CPU time (older results: the ratio of "
    "medians, and no CPU time); bytes the optimizer must move per "
    "parameter; the bandwidth floor (those bytes over the best streaming "
    "bandwidth measured in the same rounds) and the ratio to it; "
    "lowering + XLA compile time and its paired ratio to Adam's; fused "
    "kernels in the compiled step; optimizer-state bytes per parameter, "
    "measured from the state arrays (full-size buffers, and all leaves "
    "including per-leaf scalars and counters).",
    "",
  ]
  for tr in results["trees"]:
    bw = tr["bandwidth"]
    lines += [
      f"## {tr['tree']}: {tr['params'] / 1e6:.2f}M parameters, "
      f"{tr['leaves']} leaves",
      "",
      f"Bandwidth in the same rounds: copy {bw['copy']['gbps']:.2f} GB/s, "
      f"triad {bw['triad']['gbps']:.2f} GB/s.",
      "",
      "| optimizer | step ms | IQR ms | x adam | x adam (CPU) | "
      "B/param moved | floor ms | x floor | lower+compile s | x adam | "
      "fusions | state B/param (buffers / all) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tr["rows"]:
      step_ratio = r.get("x_adam_paired", r.get("x_adam_step"))
      compile_ratio = r.get("x_adam_compile_paired", r.get("x_adam_compile"))
      lines.append(
        f"| {r['optimizer']} | {r['step_ms']:.3f} | {r['iqr_ms']:.3f} | "
        f"{_fmt(step_ratio, '.2f')} | "
        f"{_fmt(r.get('x_adam_paired_cpu'), '.2f')} | "
        f"{r['bytes_per_param_moved']:g} | "
        f"{r['floor_ms']:.3f} | {r['x_floor']:.2f} | "
        f"{r['lower_s'] + r['compile_s']:.2f} | "
        f"{_fmt(compile_ratio, '.2f')} | {r['fusions']} | "
        f"{r['state_full_bytes_per_param']:.2f} / "
        f"{r['state_bytes_per_param']:.4f} |"
      )
    lines.append("")
  if results.get("skipped"):
    lines += ["Not measured: " + "; ".join(results["skipped"]), ""]
  return "\n".join(lines)


REPORT = harness.Report("Optimizer step time: Madam vs Optax", markdown_body)


def parse_args(argv=None):
  ap = harness.argument_parser(
    __doc__, name=f"step_time_{jax.default_backend()}"
  )
  ap.add_argument(
    "--sizes",
    default="1,10,30,100",
    help="flat tree sizes in millions of parameters, "
    "comma-separated ('' for none)",
  )
  ap.add_argument(
    "--trees",
    default="mlp,resnet50,gpt2_small",
    help=f"model-shaped trees, comma-separated, of {list(TREES)}",
  )
  ap.add_argument(
    "--optimizers",
    default=None,
    help="optimizers, comma-separated (default: all but the optional "
    f"{list(optional_optimizers())}, which run only when named here)",
  )
  ap.add_argument(
    "--repeats",
    type=int,
    default=None,
    help="interleaved timing rounds per tree (default 21; quick: 3)",
  )
  ap.add_argument(
    "--compile-repeats",
    type=int,
    default=None,
    help="fresh compilations per optimizer (default 3; quick: 1)",
  )
  return harness.parse_args(ap, argv, __file__)


def main(argv=None, log=harness.progress) -> dict:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  quick = args.quick
  repeats = args.repeats or (3 if quick else 21)
  compile_repeats = args.compile_repeats or (1 if quick else 3)
  bw_n = 2**20 if quick else 2**26  # 4 MiB or 256 MiB per buffer
  target_s = 0.002 if quick else 0.05
  opt_names = args.optimizers.split(",") if args.optimizers else None

  jobs = []
  if quick:
    jobs.append(("mlp_tiny", mlp_shapes((32, 64, 10))))
    jobs.append(("flat_0.1M", flat_shapes(100_000)))
  else:
    for t in [t for t in args.trees.split(",") if t]:
      if t not in TREES:
        raise ValueError(f"unknown tree {t!r}; choose from {list(TREES)}")
      jobs.append((t, TREES[t]()))
    for s in [s for s in args.sizes.split(",") if s]:
      jobs.append((f"flat_{s}M", flat_shapes(int(float(s) * 1e6))))

  skipped = []
  if not hasattr(madam_optax, "lns_madam"):
    skipped.append("madam_optax.lns_madam (not in the package at run time)")
  results = dict(
    machine=harness.machine_record(args.command),
    repeats=repeats,
    compile_repeats=compile_repeats,
    trees=[],
    skipped=skipped,
  )
  for name, shapes in jobs:
    results["trees"].append(
      bench_tree(
        name,
        shapes,
        repeats=repeats,
        compile_repeats=compile_repeats,
        bw_n=bw_n,
        target_s=target_s,
        opt_names=opt_names,
        skipped=skipped,
        log=log,
      )
    )
  for g in goal_rows(results):
    log(
      f"goal {g['goal']} <= {g['bound']:g} on {g['tree']}: "
      f"{g['ratio']:.2f} ({'met' if g['met'] else 'missed'})"
    )
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
