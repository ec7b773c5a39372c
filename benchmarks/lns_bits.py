"""Accuracy versus LNS bit width: LNS-Madam against Adam and SGD on the same grid.

For each exponent bit width ``b`` (``levels = 2**b`` magnitudes spanning a
fixed ratio ``exp(log_range)`` below each tensor's scale ``3 * RMS(w0)``, plus
a sign bit; also 127 levels, the most that fit ``int8`` codes) and two Flax NNX
models on scikit-learn's digits (an MLP and a small CNN,
``madam_examples.lns_digits``), several seeds each, trained by the examples'
shared loop (``madam_examples.loop.make_run_fn``):

* ``lns_madam_det`` / ``lns_madam_stoch``: ``madam_optax.lns_madam`` on the
  integer codes, nearest / stochastic rounding of the level step;
* ``adam_proj`` / ``sgd_proj``: ``optax.adam(1e-3)`` / ``optax.sgd(0.05,
  momentum=0.9)`` on float weights, projected onto the same grid after every
  step (``madam_optax.log_quantise``, nearest), as in the paper's comparison;
* references in float32: ``madam`` (the target), ``adam``, ``sgd``.

Zero-initialised biases stay float everywhere and are trained by Adam(1e-3)
for the Madam variants and by the method's own optimizer otherwise. Each run
is jitted once per configuration and ``vmap``-ed over the seeds (the CNN's
seeds run one after another in the same compiled run). The report
gives test accuracy (mean and std over seeds), the smallest bit width at which
LNS-Madam's mean is within 0.5 points of float Madam's, and a plot.

Usage::

  python benchmarks/lns_bits.py              # full sweep, writes benchmarks/results/lns_bits.*
  python benchmarks/lns_bits.py --quick      # a smoke run; writes only with --out
  python benchmarks/lns_bits.py --seeds 5 --steps 1000 --models mlp
  python benchmarks/lns_bits.py --replot   # table and figure from the JSON

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560 (section on
natively compressed networks).
"""

from __future__ import annotations

import time

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

from madam_examples import lns_digits
from madam_examples import loop
from madam_examples import optimizers as optimizers_lib
from madam_examples import step as step_lib
import madam_optax

LNS_METHODS = ("lns_madam_det", "lns_madam_stoch", "adam_proj", "sgd_proj")
FLOAT_METHODS = ("madam", "adam", "sgd")
# The float optimizers' learning rates (LNS-Madam: lns_madam's default 0.01).
LEARNING_RATES = {"madam": 0.01, "adam": 1e-3, "sgd": 0.05}
TOLERANCE = 0.5  # accuracy points

# --------------------------------------------------------------------------
# Training: the examples' shared loop (madam_examples.loop.make_run_fn) on
# madam_examples.lns_digits' digits tasks, one compiled run per configuration
# for every seed.


def method_optimizer(
  method: str, fmt: madam_optax.LNSFormat | None
) -> tuple[loop.Optimizer, float, dict]:
  """How the shared loop trains ``method``: optimizer, learning rate, options.

  The optimizer is a name of :mod:`madam_examples.optimizers` (Madam, Adam,
  SGD; LNS-Madam on integer codes with ``lns_format``), whose Madam variants
  hand the leaves they cannot move (zero-initialised biases) to Adam(1e-3);
  or, for the projected methods, a factory ``(learning_rate, params) -> tx``:
  the float optimizer followed by the projection of the other leaves onto
  the LNS grid (``madam_optax.log_quantise``, nearest).

  Returns:
    ``(optimizer, learning_rate, options)``, the options being keywords of
    :func:`madam_examples.loop.make_run_fn`.
  """
  if method.startswith("lns_madam"):
    rounding = "nearest" if method == "lns_madam_det" else "stochastic"
    return (
      "lns_madam",
      LEARNING_RATES["madam"],
      {"lns_format": fmt, "rounding": rounding},
    )
  base = method.removesuffix("_proj")
  if not method.endswith("_proj"):
    return base, LEARNING_RATES[base], {}

  def projected(learning_rate, params):
    mask = jax.tree.map(
      lambda label: label == "multiplicative",
      madam_optax.multiplicative_labels(params),
    )
    return optax.chain(
      optimizers_lib.make_optimizer(base, learning_rate, params),
      optax.masked(madam_optax.log_quantise(fmt), mask),
    )

  return projected, LEARNING_RATES[base], {}


def code_bits(task: loop.Task, fmt: madam_optax.LNSFormat) -> list[int]:
  """The bit widths of the integer codes an LNS run of ``task`` trains.

  Read from the encoded initial state; the training loop's ``lax.scan``
  carries its state with unchanged dtypes, so they are the trained codes'.
  """
  codes, _ = jax.eval_shape(
    lambda key: step_lib.encode_lns(
      task.init(key), loop.reference_params(task), fmt, p_scale=task.p_scale
    ),
    jax.random.key(0),
  )
  return sorted(
    {
      8 * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(codes)
      if jnp.issubdtype(x.dtype, jnp.integer)
    }
  )


def run_config(task, method, levels, seeds, steps, log_range):
  """Test accuracies over ``seeds``, integer code widths, seconds.

  The MLP's seeds are ``vmap``-ed; the CNN loops over them with one compiled
  run (a ``vmap``-ed convolution becomes a grouped convolution, which XLA's
  CPU backend runs far slower than the seeds one after another).
  """
  fmt = madam_optax.LNSFormat.spanning(levels, log_range) if levels else None
  optimizer, learning_rate, options = method_optimizer(method, fmt)
  run = loop.make_run_fn(
    task, optimizer, steps, steps, schedule="constant", **options
  )
  keys = [jax.random.key(int(seed)) for seed in seeds]
  learning_rate = jnp.float32(learning_rate)
  t0 = time.perf_counter()
  if task.name == "mlp":
    history = jax.jit(jax.vmap(run, in_axes=(0, None, None)))(
      jnp.stack(keys), learning_rate, task.data
    )
    accs = history["accuracy"][:, -1]
  else:
    one = jax.jit(run)
    accs = [one(key, learning_rate, task.data)["accuracy"][-1] for key in keys]
  accs = np.asarray(jax.device_get(accs), np.float64)
  bits = code_bits(task, fmt) if method.startswith("lns_madam") else []
  return accs, bits, time.perf_counter() - t0


def smallest_bits(rows, float_mean, method):
  """Smallest exponent-bit width (levels 2**b) whose mean is within TOLERANCE,
  with every wider width also within it."""
  ok = [r for r in rows if r["method"] == method and r["bits"] is not None]
  ok.sort(key=lambda r: r["bits"])
  best = None
  for r in reversed(ok):
    if r["mean"] >= float_mean - TOLERANCE:
      best = r["bits"]
    else:
      break
  return best


def sweep_model(model_name, settings, float_methods, levels_list, log):
  """Every float reference and every (levels, LNS method) on one model."""
  seeds = list(range(settings["seeds"]))
  steps = settings["cnn_steps"] if model_name == "cnn" else settings["steps"]
  task = lns_digits.digits_task(model_name, steps, settings["batch"])
  res = {"rows": [], "float": {}, "steps": steps}
  for method in float_methods:
    accs, _, dt = run_config(
      task, method, None, seeds, steps, settings["log_range"]
    )
    res["float"][method] = dict(
      mean=accs.mean(), std=accs.std(), accs=accs.tolist(), seconds=dt
    )
    log(
      f"{model_name} {method:>16} float32  {accs.mean():6.2f} "
      f"+- {accs.std():.2f}  ({dt:.1f}s)"
    )
  for levels in levels_list:
    bits = int(np.log2(levels)) if 2 ** int(np.log2(levels)) == levels else None
    grid = str(madam_optax.LNSFormat.spanning(levels).dtype)
    for method in LNS_METHODS:
      accs, widths, dt = run_config(
        task, method, levels, seeds, steps, settings["log_range"]
      )
      codes = f"int{widths[0]}" if widths else grid + " grid"
      res["rows"].append(
        dict(
          method=method,
          levels=levels,
          bits=bits,
          codes=codes if method.startswith("lns") else grid,
          mean=accs.mean(),
          std=accs.std(),
          accs=accs.tolist(),
          seconds=dt,
        )
      )
      log(
        f"{model_name} {method:>16} L={levels:<5d} {accs.mean():6.2f} "
        f"+- {accs.std():.2f}  codes {codes} ({dt:.1f}s)"
      )
  fl = res["float"]["madam"]["mean"]
  res["smallest_bits"] = {
    m: smallest_bits(res["rows"], fl, m)
    for m in ("lns_madam_det", "lns_madam_stoch")
  }
  log(
    f"{model_name}: smallest exponent bits within {TOLERANCE} of float "
    f"Madam: {res['smallest_bits']}"
  )
  return res


# --------------------------------------------------------------------------
# Report and command line.


def markdown_body(results: dict) -> str:
  """The tables below the machine record (from the JSON's contents)."""
  a = results["args"]
  lines = [
    f"{a['seeds']} seeds, {a['steps']} (MLP) and {a['cnn_steps']} (CNN) "
    f"steps of batch {a['batch']}; grids span "
    f"exp({a['log_range']}) below each tensor's scale 3*RMS(w0); "
    f"`bits` = exponent bits (levels = 2**bits), plus one sign bit; "
    "codes are int8 up to 127 levels, int16 above. Mean +- std of test "
    "accuracy (%), 450 test images.",
    "",
  ]
  for model_name, res in results["results"].items():
    fl = res["float"]
    lines += [
      f"## {model_name}",
      "",
      "Float32 references: "
      + ", ".join(f"{m} {fl[m]['mean']:.2f} +- {fl[m]['std']:.2f}" for m in fl),
      "",
    ]
    header = "| bits | levels | codes | " + " | ".join(LNS_METHODS) + " |"
    lines += [header, "|" + "---|" * (3 + len(LNS_METHODS))]
    by = {}
    for r in res["rows"]:
      by.setdefault(r["levels"], {})[r["method"]] = r
    for levels in sorted(by):
      row = by[levels]
      any_r = next(iter(row.values()))
      bits = any_r["bits"]
      cells = [
        f"{row[m]['mean']:.2f} +- {row[m]['std']:.2f}" if m in row else ""
        for m in LNS_METHODS
      ]
      lines.append(
        f"| {bits if bits is not None else '-'} | {levels} | "
        f"{any_r['codes']} | " + " | ".join(cells) + " |"
      )
    lines.append("")
    for method in ("lns_madam_stoch", "lns_madam_det"):
      b = res["smallest_bits"][method]
      lines.append(
        f"- {method}: smallest width within {TOLERANCE} points of float "
        f"Madam ({fl['madam']['mean']:.2f}): "
        + (
          f"{b} exponent bits + sign = {b + 1} bits"
          if b is not None
          else "none in the sweep"
        )
      )
    lines.append("")
  return "\n".join(lines)


def figure(results: dict, plt):
  """Accuracy against exponent bits, one panel per model."""
  models = results["results"]
  fig, axes = plt.subplots(
    1, len(models), figsize=(6 * len(models), 4.2), squeeze=False
  )
  for ax, (model_name, res) in zip(axes[0], models.items()):
    fl = res["float"]["madam"]["mean"]
    ax.axhspan(
      fl - TOLERANCE,
      fl + TOLERANCE,
      color="0.85",
      label=f"float Madam +- {TOLERANCE}",
    )
    ax.axhline(fl, color="k", lw=1)
    for method in LNS_METHODS:
      rows = sorted(
        (
          r
          for r in res["rows"]
          if r["method"] == method and r["bits"] is not None
        ),
        key=lambda r: r["bits"],
      )
      ax.errorbar(
        [r["bits"] for r in rows],
        [r["mean"] for r in rows],
        yerr=[r["std"] for r in rows],
        marker="o",
        capsize=3,
        label=method,
      )
    ax.set_xlabel("exponent bits (levels = 2**bits; + 1 sign bit)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits {model_name}")
    ax.set_ylim(max(0, fl - 40), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  return fig


REPORT = harness.Report(
  "LNS-Madam: test accuracy versus bit width (scikit-learn digits)",
  markdown_body,
  figure,
)


def parse_args(argv=None):
  parser = harness.argument_parser(__doc__, "lns_bits")
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument(
    "--steps", type=int, default=800, help="training steps for the MLP"
  )
  parser.add_argument(
    "--cnn-steps",
    type=int,
    default=300,
    help="training steps for the CNN (each costs ~10x more)",
  )
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--bits", default="3,4,5,6,7,8,9,10,11,12")
  parser.add_argument("--log-range", type=float, default=4.0)
  return harness.parse_args(parser, argv, __file__)


def main(argv=None, log=harness.progress) -> dict:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  float_methods = FLOAT_METHODS
  if args.quick:
    args.models, args.seeds, args.steps, args.bits = "mlp", 2, 30, "4"
    args.cnn_steps = 30
    float_methods = ("madam",)
  settings = {
    k: getattr(args, k)
    for k in (
      "quick",
      "models",
      "seeds",
      "steps",
      "cnn_steps",
      "batch",
      "bits",
      "log_range",
    )
  }
  bits_list = [int(b) for b in args.bits.split(",")]
  levels_list = sorted(
    {2**b for b in bits_list} | ({127} if not args.quick else set())
  )
  results = {
    "machine": harness.machine_record(args.command),
    "args": settings,
    "results": {},
  }
  t_all = time.perf_counter()
  for model_name in args.models.split(","):
    results["results"][model_name] = sweep_model(
      model_name, settings, float_methods, levels_list, log
    )
  results["total_seconds"] = time.perf_counter() - t_all
  log(f"total {results['total_seconds']:.0f}s")
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
