"""LNS-Madam with a first moment: what the buffer costs, and its dtype.

``lns_madam(fmt, b1=0.9)`` feeds the integer level step Adam's bias-corrected
``m_hat / sqrt(v_hat)`` instead of ``g / sqrt(v_hat)``; the first moment is
one more buffer of the weights' size. Two measurements:

* **memory**: bytes of the stored weights plus the optimizer state per
  parameter, on the GPT-2-small-shaped tree of ``lns_memory.py`` (imported
  from there), for int8 codes with no first moment, a float32, a bfloat16
  and an int8 one (see below), beside the float32 second moment or a
  bfloat16 one;
* **training**: the examples' character Transformer
  (``madam_examples.tasks.build_task("transformer")``, the model of
  ``python -m madam_examples.lns_transformer``) trained with int8 codes by
  each first-moment dtype, over several seeds; the final validation
  perplexity per run. All variants keep the full (unfactored) second moment:
  ``lns_madam(factored=True)`` keeps no first moment.

The int8 first moment (``int8 mu`` below) is an experiment of this script,
not a library option: each entry stores a fixed-point code of the
normalised direction ``u = m_hat / sqrt(v_hat)``,
``q = R(127 u / B)`` in ``[-127, 127]`` with stochastic rounding ``R`` (the
level step's hashed bits) and ``B = (1 - b1) / sqrt((1 - b2)(1 - b1**2 /
b2))``, the Cauchy-Schwarz bound of ``|m_t| / sqrt(v_t)`` (7.27 at the
defaults). Each step decodes ``m_hat`` with the old root, updates it, and
encodes it again with the new one; the update itself uses the unrounded
``m_hat`` of the step. No per-tensor scale: the step stays elementwise.

Usage::

  python benchmarks/lns_first_moment.py                 # both, writes results/
  python benchmarks/lns_first_moment.py --steps 300 --seeds 0,1,2
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import _harness as harness
import jax
import jax.numpy as jnp
import lns_memory
import numpy as np
import optax

from madam_examples import loop
from madam_examples import tasks
import madam_optax
from madam_optax._src import lns
from madam_optax._src import moments
from madam_optax._src import second_moment

INT8 = madam_optax.LNSFormat.spanning(127)
B1, B2 = 0.9, 0.999
ADDITIVE_LR = 1e-3  # Adam for the zero-initialised leaves, as the examples


class Int8FirstMomentState(NamedTuple):
  count: jax.Array
  key: jax.Array
  q: Any  # int8 codes of u = m_hat / sqrt(v_hat)
  rms_hat: Any  # sqrt(v_hat)


def direction_bound(b1: float, b2: float) -> float:
  """``B``: ``|m_t| / sqrt(v_t) <= B`` for every gradient sequence."""
  return (1 - b1) / math.sqrt((1 - b2) * (1 - b1**2 / b2))


def scale_by_moments_int8_mu(
  b1: float = B1, b2: float = B2, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
  """``scale_by_moments`` keeping the first moment as int8 codes of ``u``."""
  step_size = direction_bound(b1, b2) / 127.0

  def init_fn(params):
    zeros = lambda dtype: jax.tree.map(  # noqa: E731
      lambda p: jnp.zeros(jnp.shape(p), dtype), params
    )
    return Int8FirstMomentState(
      count=jnp.zeros([], jnp.int32),
      key=lns.initial_key(seed, "hash"),
      q=zeros(jnp.int8),
      rms_hat=zeros(jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = optax.safe_increment(state.count)
    f32 = np.dtype(np.float32)
    sqrt_a, sqrt_1ma = second_moment.moment_scalars(b2, count, f32)
    a, one_minus_a = moments.first_moment_scalars(b1, count, f32)
    leaves, treedef = jax.tree.flatten(updates)
    key, keys = lns.split_key(state.key, len(leaves), "hash")

    def leaf(g, q, r, k):
      g = g.astype(f32)
      finite = jnp.isfinite(g)
      # m_hat_{t-1} = u_{t-1} sqrt(v_hat_{t-1}) (0 at t=1, where q = r = 0).
      m_old = q.astype(f32) * step_size * r
      new_r = jnp.where(
        finite, second_moment.updated_root(g, r, sqrt_a, sqrt_1ma), r
      )
      m = jnp.where(finite, moments.updated_mean(g, m_old, a, one_minus_a), 0.0)
      u = second_moment.divided_by_root(m, new_r)
      code = lns.round_levels(u / step_size, "stochastic", k, "hash")
      new_q = jnp.where(finite, jnp.clip(code, -127, 127), q.astype(f32))
      u = jnp.where(finite, u, jnp.nan)
      return u, new_q.astype(jnp.int8), new_r

    outs = [
      leaf(g, q, r, k)
      for g, q, r, k in zip(
        leaves,
        treedef.flatten_up_to(state.q),
        treedef.flatten_up_to(state.rms_hat),
        keys,
      )
    ]
    u, q, rms_hat = (treedef.unflatten([o[i] for o in outs]) for i in range(3))
    return u, Int8FirstMomentState(count=count, key=key, q=q, rms_hat=rms_hat)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lns_madam_int8_mu(fmt, learning_rate, *, seed=0):
  """``lns_madam(fmt, b1=0.9)`` with the int8 first moment above."""
  normalise = scale_by_moments_int8_mu(seed=seed + 1)
  return optax.chain(
    normalise,
    optax.clip(10.0),
    madam_optax.lns_level_step(fmt, learning_rate, seed=seed),
  )


# name -> (lns_madam factory (fmt, learning_rate, seed) -> tx).
VARIANTS = {
  "no mu (b1=0)": lambda fmt, lr, seed: madam_optax.lns_madam(
    fmt, lr, seed=seed
  ),
  "fp32 mu": lambda fmt, lr, seed: madam_optax.lns_madam(
    fmt, lr, seed=seed, b1=B1
  ),
  "bf16 mu": lambda fmt, lr, seed: madam_optax.lns_madam(
    fmt, lr, seed=seed, b1=B1, mu_dtype=jnp.bfloat16
  ),
  "int8 mu": lambda fmt, lr, seed: lns_madam_int8_mu(fmt, lr, seed=seed),
}
MEMORY_CONFIGS = {
  "int8 codes + fp32 v, no mu": lambda: madam_optax.lns_madam(INT8),
  "int8 codes + fp32 v + fp32 mu": lambda: madam_optax.lns_madam(INT8, b1=B1),
  "int8 codes + fp32 v + bf16 mu": lambda: madam_optax.lns_madam(
    INT8, b1=B1, mu_dtype=jnp.bfloat16
  ),
  "int8 codes + fp32 v + int8 mu": lambda: lns_madam_int8_mu(INT8, 0.01),
  "int8 codes + bf16 v, no mu": lambda: madam_optax.lns_madam(
    INT8, state_dtype=jnp.bfloat16
  ),
  "int8 codes + bf16 v + bf16 mu": lambda: madam_optax.lns_madam(
    INT8, b1=B1, state_dtype=jnp.bfloat16
  ),
  "int8 codes + factored v, no mu": lambda: madam_optax.lns_madam(
    INT8, factored=True
  ),
}


def measure_memory(params) -> list[dict]:
  n = harness.param_count(params)
  rows = []
  for name, make_tx in MEMORY_CONFIGS.items():
    weights, tx = harness.stored_for_training(
      params, make_tx(), INT8, additive=True
    )
    state = tx.init(weights["params"])
    rows.append(
      dict(
        config=name,
        weights=harness.tree_bytes(weights),
        state=harness.tree_bytes(state),
        bytes_per_param=harness.tree_bytes((weights, state)) / n,
      )
    )
    del weights, state
  return rows


def train_once(task, variant: str, lr: float, seed: int, steps: int) -> dict:
  make = VARIANTS[variant]

  def factory(learning_rate, params):
    return madam_optax.with_additive_fallback(
      params, make(INT8, learning_rate, seed), optax.adam(ADDITIVE_LR)
    )

  start = time.perf_counter()
  _, history = loop.train(
    task,
    factory,
    lr,
    seed=seed,
    steps=steps,
    eval_every=steps,
    lns_format=INT8,
  )
  return dict(
    variant=variant,
    seed=seed,
    perplexity=float(history["perplexity"][-1]),
    seconds=time.perf_counter() - start,
  )


def markdown_body(results: dict) -> str:
  mem = results.get("memory")
  lines = []
  if mem is not None:
    lines += [
      f"## Bytes per parameter: {lns_memory.GPT2} ({mem['parameters']} "
      "parameters)",
      "",
      "Stored weights (int8 codes, their float32 per-tensor scales, float32 "
      "biases) plus the whole optimizer state (biases: Adam, 12 B each), "
      "from the arrays' `.nbytes`, per parameter. The first moment adds "
      "4 B (float32), 2 B (bfloat16) or 1 B (int8) per coded weight.",
      "",
      "| configuration | weights B | state B | bytes/param |",
      "|---|---|---|---|",
    ]
    for r in mem["rows"]:
      lines.append(
        f"| {r['config']} | {r['weights']} | {r['state']} | "
        f"{r['bytes_per_param']:.3f} |"
      )
    lines.append("")
  runs = results.get("training")
  if runs:
    cfg = results["training_config"]
    lines += [
      "## Training: the character Transformer with int8 codes",
      "",
      f"{cfg['steps']} steps, peak rate {cfg['lr']} (cosine decay to 0), "
      f"seeds {cfg['seeds']}; full second moment (float32), b1 = {B1}, "
      f"b2 = {B2}; zero-initialised leaves trained by Adam "
      f"({ADDITIVE_LR}). Final validation perplexity per seed, mean and "
      "standard deviation over seeds.",
      "",
      "| first moment | perplexity per seed | mean | std |",
      "|---|---|---|---|",
    ]
    for variant in VARIANTS:
      ppl = [r["perplexity"] for r in runs if r["variant"] == variant]
      if not ppl:
        continue
      std = float(np.std(ppl, ddof=1)) if len(ppl) > 1 else float("nan")
      lines.append(
        f"| {variant} | {', '.join(f'{p:.3f}' for p in ppl)} | "
        f"{np.mean(ppl):.3f} | {std:.3f} |"
      )
    lines.append("")
  return "\n".join(lines)


REPORT = harness.Report(
  "LNS-Madam with a first moment: memory and training", markdown_body
)


def parse_args(argv=None):
  ap = harness.argument_parser(__doc__, "lns_first_moment")
  ap.add_argument("--steps", type=int, default=300, help="training steps")
  ap.add_argument("--lr", type=float, default=0.01, help="peak rate")
  ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  ap.add_argument(
    "--variants",
    default=",".join(VARIANTS),
    help=f"comma-separated, of {list(VARIANTS)}",
  )
  ap.add_argument("--no-memory", action="store_true", help="skip memory")
  ap.add_argument("--no-training", action="store_true", help="skip training")
  return harness.parse_args(ap, argv, __file__)


def main(argv=None, log=harness.progress) -> dict:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  results: dict[str, Any] = {"machine": harness.machine_record(args.command)}
  if not args.no_memory:
    log(f"{lns_memory.GPT2} ...")
    params = lns_memory.gpt2_small_params()
    results["memory"] = dict(
      parameters=harness.param_count(params), rows=measure_memory(params)
    )
    del params
  if not args.no_training:
    steps = min(args.steps, 20) if args.quick else args.steps
    seeds = [int(s) for s in args.seeds.split(",") if s]
    task = tasks.build_task("transformer", quick=args.quick)
    results["training_config"] = dict(steps=steps, lr=args.lr, seeds=seeds)
    runs = []
    for seed in seeds:
      for variant in args.variants.split(","):
        run = train_once(task, variant, args.lr, seed, steps)
        log(f"{variant} seed {seed}: {run['perplexity']:.3f} ppl")
        runs.append(run)
    results["training"] = runs
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
