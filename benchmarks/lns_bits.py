"""Accuracy versus LNS bit width: LNS-Madam against Adam and SGD on the same grid.

For each exponent bit width ``b`` (``levels = 2**b`` magnitudes spanning a
fixed ratio ``exp(log_range)`` below each tensor's scale ``3 * RMS(w0)``, plus
a sign bit; also 127 levels, the most that fit ``int8`` codes) and two Flax NNX
models on scikit-learn's digits (an MLP and a small CNN,
``madam_examples.lns_digits``), several seeds each:

* ``lns_madam_det`` / ``lns_madam_stoch``: ``madam_optax.lns_madam`` on the
  integer codes, nearest / stochastic rounding of the level step;
* ``adam_proj`` / ``sgd_proj``: ``optax.adam(1e-3)`` / ``optax.sgd(0.05,
  momentum=0.9)`` on float weights, projected onto the same grid after every
  step (``madam_optax.log_quantise``, nearest), as in the paper's comparison;
* references in float32: ``madam`` (the target), ``adam``, ``sgd``.

Zero-initialised biases stay float everywhere and are trained by Adam(1e-3)
for the Madam variants and by the method's own optimizer otherwise. Each run
is jitted once per configuration and ``vmap``-ed over the seeds. The report
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

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import _harness as harness
import madam_optax
from madam_examples import lns_digits
from madam_examples import optimizers as optimizers_lib

LNS_METHODS = ("lns_madam_det", "lns_madam_stoch", "adam_proj", "sgd_proj")
FLOAT_METHODS = ("madam", "adam", "sgd")
# The float optimizers' learning rates (LNS-Madam: lns_madam's default 0.01).
LEARNING_RATES = {"madam": 0.01, "adam": 1e-3, "sgd": 0.05}
TOLERANCE = 0.5        # accuracy points

# --------------------------------------------------------------------------
# Model, data and training. The models and data are madam_examples.lns_digits'
# (MODELS, load_digits, cross_entropy); the float optimizers are
# madam_examples.optimizers.make_optimizer's. The loop is functional (jax.lax.scan
# over steps), so that one compiled run trains every seed.


def build_optimizer(method: str, fmt, params, seed) -> optax.GradientTransformation:
  """The optimizer of ``method``; ``params``: concrete float initial weights.

  Leaves Madam cannot move (zero-initialised biases) go to Adam in the Madam
  variants (``with_additive_fallback``); the projected methods quantise only
  the other leaves.
  """
  if method.startswith("lns_madam"):
    rounding = "nearest" if method == "lns_madam_det" else "stochastic"
    return madam_optax.with_additive_fallback(
        params, madam_optax.lns_madam(fmt, rounding=rounding, seed=seed),
        optax.adam(optimizers_lib.ADDITIVE_FALLBACK_LR))
  base = method.removesuffix("_proj")
  tx = optimizers_lib.make_optimizer(base, LEARNING_RATES[base], params)
  if method.endswith("_proj"):
    mask = jax.tree.map(lambda label: label == "multiplicative",
                        madam_optax.multiplicative_labels(params))
    tx = optax.chain(tx, optax.masked(madam_optax.log_quantise(fmt), mask))
  return tx


def initial_states(model_name, method, fmt, seeds):
  """Stacked (start, scales) over seeds, and seed 0's float weights.

  ``start`` is the initial state trained (codes for LNS-Madam, float weights
  otherwise); ``scales`` the per-tensor scales (LNS-Madam) or the original
  float weights (projected methods: their grid scale comes from them).
  """
  starts, scales_list, reference = [], [], None
  for seed in seeds:
    model = lns_digits.MODELS[model_name](nnx.Rngs(int(seed)))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    reference = params if reference is None else reference
    labels = madam_optax.multiplicative_labels(params)
    if method.startswith("lns_madam"):
      codes, scales = madam_optax.lns_encode_tree(params, fmt)
      # None scales (float biases) are not arrays: give them a dummy scalar.
      scales = jax.tree.map(lambda s: jnp.float32(0) if s is None else s,
                            scales, is_leaf=lambda s: s is None)
      starts.append(codes)
      scales_list.append(scales)
    elif method.endswith("_proj"):
      projected = jax.tree.map(
          lambda p, label: madam_optax.lns_decode(
              *madam_optax.lns_encode(p, fmt), fmt)
          if label == "multiplicative" else p, params, labels)
      starts.append(projected)
      scales_list.append(params)
    else:
      starts.append(params)
      scales_list.append(params)
  def stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return stack(starts), stack(scales_list), reference


def make_runner(model_name, method, fmt, reference, data, steps, batch):
  """A jitted ``run(start, scales, seeds) -> test accuracies`` over stacked seeds.

  The MLP is ``vmap``-ed over the seeds; the CNN loops over them with one
  compiled function (a ``vmap``-ed convolution becomes a grouped convolution,
  which XLA's CPU backend runs far slower than the seeds one after another).
  ``start`` and ``scales``: see :func:`initial_states`.
  """
  graphdef = nnx.split(lns_digits.MODELS[model_name](nnx.Rngs(0)), nnx.Param)[0]
  x_tr, y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  lns = method.startswith("lns_madam")

  def loss(weights, x, y):
    return lns_digits.cross_entropy(nnx.merge(graphdef, weights)(x), y)

  def train_one(start, scales, seed):
    tx = build_optimizer(method, fmt, reference, seed)
    state = tx.init(scales if method.endswith("_proj") else start)
    if lns:
      value_and_grad = madam_optax.lns_value_and_grad(loss, scales, fmt)
    else:
      value_and_grad = jax.value_and_grad(loss)

    def step(carry, key):
      params, state = carry
      idx = jax.random.randint(key, (batch,), 0, x_tr.shape[0])
      _, grads = value_and_grad(params, x_tr[idx], y_tr[idx])
      return harness.update_and_apply(tx, grads, state, params), None

    keys = jax.random.split(jax.random.PRNGKey(seed + 1000), steps)
    (params, _), _ = jax.lax.scan(step, (start, state), keys)
    weights = (madam_optax.lns_decode_tree(params, scales, fmt) if lns
               else params)
    logits = nnx.merge(graphdef, weights)(x_te)
    dtypes = jnp.array([jnp.iinfo(p.dtype).bits if jnp.issubdtype(
        p.dtype, jnp.integer) else 0 for p in jax.tree.leaves(params)])
    return jnp.mean(jnp.argmax(logits, -1) == y_te) * 100.0, dtypes

  if model_name == "mlp":
    return jax.jit(jax.vmap(train_one))
  one = jax.jit(train_one)

  def run(start, scales, seeds):
    outs = [one(*jax.tree.map(lambda x, i=i: x[i], (start, scales)), seed)
            for i, seed in enumerate(seeds)]
    return tuple(jnp.stack(xs) for xs in zip(*outs))

  return run


# --------------------------------------------------------------------------
# The sweep.


def run_config(model_name, method, levels, seeds, data, steps, batch, log_range):
  """Test accuracies over ``seeds``, integer code widths seen, seconds."""
  fmt = madam_optax.LNSFormat.spanning(levels, log_range) if levels else None
  fmt_for_init = fmt or madam_optax.LNSFormat.spanning(127, log_range)
  start, scales, reference = initial_states(model_name, method, fmt_for_init,
                                            seeds)
  if method.startswith("lns_madam"):
    # Scales of float leaves were dummies: decode only the integer leaves.
    scales = jax.tree.map(
        lambda s, c: None if not jnp.issubdtype(c.dtype, jnp.integer) else s,
        scales, start)
  runner = make_runner(model_name, method, fmt, reference, data, steps, batch)
  t0 = time.perf_counter()
  accs, dtype_bits = runner(start, scales, jnp.asarray(seeds, jnp.int32))
  accs = np.asarray(accs, np.float64)
  return accs, sorted(set(np.asarray(dtype_bits).ravel().tolist()) - {0}), \
      time.perf_counter() - t0


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


def sweep_model(model_name, settings, float_methods, levels_list, data, log):
  """Every float reference and every (levels, LNS method) on one model."""
  seeds = list(range(settings["seeds"]))
  steps = settings["cnn_steps"] if model_name == "cnn" else settings["steps"]
  res = {"rows": [], "float": {}, "steps": steps}
  for method in float_methods:
    accs, _, dt = run_config(model_name, method, None, seeds, data,
                             steps, settings["batch"], settings["log_range"])
    res["float"][method] = dict(mean=accs.mean(), std=accs.std(),
                                accs=accs.tolist(), seconds=dt)
    log(f"{model_name} {method:>16} float32  {accs.mean():6.2f} "
        f"+- {accs.std():.2f}  ({dt:.1f}s)")
  for levels in levels_list:
    bits = int(np.log2(levels)) if 2 ** int(np.log2(levels)) == levels else None
    grid = str(madam_optax.LNSFormat.spanning(levels).dtype)
    for method in LNS_METHODS:
      accs, code_bits, dt = run_config(model_name, method, levels, seeds,
                                       data, steps, settings["batch"],
                                       settings["log_range"])
      codes = f"int{code_bits[0]}" if code_bits else grid + " grid"
      res["rows"].append(dict(method=method, levels=levels, bits=bits,
                              codes=codes if method.startswith("lns")
                              else grid,
                              mean=accs.mean(), std=accs.std(),
                              accs=accs.tolist(), seconds=dt))
      log(f"{model_name} {method:>16} L={levels:<5d} {accs.mean():6.2f} "
          f"+- {accs.std():.2f}  codes {codes} ({dt:.1f}s)")
  fl = res["float"]["madam"]["mean"]
  res["smallest_bits"] = {m: smallest_bits(res["rows"], fl, m)
                          for m in ("lns_madam_det", "lns_madam_stoch")}
  log(f"{model_name}: smallest exponent bits within {TOLERANCE} of float "
      f"Madam: {res['smallest_bits']}")
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
      ""]
  for model_name, res in results["results"].items():
    fl = res["float"]
    lines += [f"## {model_name}", "",
              "Float32 references: " + ", ".join(
                  f"{m} {fl[m]['mean']:.2f} +- {fl[m]['std']:.2f}"
                  for m in fl), ""]
    header = "| bits | levels | codes | " + " | ".join(LNS_METHODS) + " |"
    lines += [header, "|" + "---|" * (3 + len(LNS_METHODS))]
    by = {}
    for r in res["rows"]:
      by.setdefault(r["levels"], {})[r["method"]] = r
    for levels in sorted(by):
      row = by[levels]
      any_r = next(iter(row.values()))
      bits = any_r["bits"]
      cells = [f"{row[m]['mean']:.2f} +- {row[m]['std']:.2f}" if m in row
               else "" for m in LNS_METHODS]
      lines.append(f"| {bits if bits is not None else '-'} | {levels} | "
                   f"{any_r['codes']} | " + " | ".join(cells) + " |")
    lines.append("")
    for method in ("lns_madam_stoch", "lns_madam_det"):
      b = res["smallest_bits"][method]
      lines.append(
          f"- {method}: smallest width within {TOLERANCE} points of float "
          f"Madam ({fl['madam']['mean']:.2f}): " +
          (f"{b} exponent bits + sign = {b + 1} bits" if b is not None
           else "none in the sweep"))
    lines.append("")
  return "\n".join(lines)


def figure(results: dict, plt):
  """Accuracy against exponent bits, one panel per model."""
  models = results["results"]
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2),
                           squeeze=False)
  for ax, (model_name, res) in zip(axes[0], models.items()):
    fl = res["float"]["madam"]["mean"]
    ax.axhspan(fl - TOLERANCE, fl + TOLERANCE, color="0.85",
               label=f"float Madam +- {TOLERANCE}")
    ax.axhline(fl, color="k", lw=1)
    for method in LNS_METHODS:
      rows = sorted((r for r in res["rows"] if r["method"] == method
                     and r["bits"] is not None), key=lambda r: r["bits"])
      ax.errorbar([r["bits"] for r in rows], [r["mean"] for r in rows],
                  yerr=[r["std"] for r in rows], marker="o", capsize=3,
                  label=method)
    ax.set_xlabel("exponent bits (levels = 2**bits; + 1 sign bit)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits {model_name}")
    ax.set_ylim(max(0, fl - 40), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  return fig


REPORT = harness.Report(
    "LNS-Madam: test accuracy versus bit width (scikit-learn digits)",
    markdown_body, figure)


def parse_args(argv=None):
  parser = harness.argument_parser(__doc__, "lns_bits")
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=800,
                      help="training steps for the MLP")
  parser.add_argument("--cnn-steps", type=int, default=300,
                      help="training steps for the CNN (each costs ~10x more)")
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
  settings = {k: getattr(args, k) for k in (
      "quick", "models", "seeds", "steps", "cnn_steps", "batch", "bits",
      "log_range")}
  bits_list = [int(b) for b in args.bits.split(",")]
  levels_list = sorted({2 ** b for b in bits_list} |
                       ({127} if not args.quick else set()))
  results = {"machine": harness.machine_record(args.command),
             "args": settings, "results": {}}
  data = lns_digits.load_digits()
  t_all = time.perf_counter()
  for model_name in args.models.split(","):
    results["results"][model_name] = sweep_model(
        model_name, settings, float_methods, levels_list, data, log)
  results["total_seconds"] = time.perf_counter() - t_all
  log(f"total {results['total_seconds']:.0f}s")
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
