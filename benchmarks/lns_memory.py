"""Training memory per parameter: LNS-Madam's integer codes against float optimizers.

Bytes of everything a training step keeps between steps, measured from the
actual arrays (``.nbytes`` of every leaf): the stored weights (LNS codes plus
their per-tensor float32 scales, or float32 weights) and the optimizer state.
Configurations:

* ``lns_madam int8 + bf16 v``: 127-level codes (``int8``), second moment in
  ``bfloat16`` (``state_dtype=jnp.bfloat16``);
* ``lns_madam int8 + fp32 v``: the same with a float32 second moment;
* ``lns_madam int16 + fp32 v``: 4096-level codes (``int16``);
* ``lns_madam int8 + factored v``: ``int8`` codes with the factored second
  moment (``factored=True``: one float32 statistic per row and per column of
  each matrix whose two largest dimensions are at least 128, Adafactor's
  rule; the full one for the rest);
* ``madam fp32``: ``madam_optax.madam()`` on float32 weights;
* ``madam fp32 + factored v``: ``madam(factored=True)``;
* ``adam fp32``: ``optax.adam`` on float32 weights (weights, mu, nu).

Models: two MLPs, and a tree shaped like GPT-2 small (124M parameters: tied
50257 x 768 token embedding, 1024 x 768 positions, 12 blocks of attention
and MLP matrices with their biases and LayerNorms).

Zero-initialised biases follow the library's recipe in every Madam variant
(kept float32, trained additively by ``optax.adam`` through
``madam_optax.with_additive_fallback``), so they cost Adam's 12 bytes each;
the table also gives bytes per weight-matrix element alone.

Usage::

  python benchmarks/lns_memory.py            # writes benchmarks/results/lns_memory.{md,json}
  python benchmarks/lns_memory.py --quick    # the small model, prints only
  python benchmarks/lns_memory.py --replot   # the table from the JSON

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import madam_optax

INT8 = madam_optax.LNSFormat.spanning(127)
INT16 = madam_optax.LNSFormat.spanning(4096)


# name -> (optimizer factory, LNS format of the stored weights or None,
# zero-initialised leaves to Adam).
CONFIGS = {
  "lns_madam int8 + bf16 v": (
    lambda: madam_optax.lns_madam(INT8, state_dtype=jnp.bfloat16),
    INT8,
    True,
  ),
  "lns_madam int8 + fp32 v": (lambda: madam_optax.lns_madam(INT8), INT8, True),
  "lns_madam int16 + fp32 v": (
    lambda: madam_optax.lns_madam(INT16),
    INT16,
    True,
  ),
  "lns_madam int8 + factored v": (
    lambda: madam_optax.lns_madam(INT8, factored=True),
    INT8,
    True,
  ),
  "madam fp32": (madam_optax.madam, None, True),
  "madam fp32 + factored v": (
    lambda: madam_optax.madam(factored=True),
    None,
    True,
  ),
  "adam fp32": (lambda: optax.adam(1e-3), None, False),
}
# The goal of the factored configuration on GPT-2 small, biases included.
GOAL_BYTES_PER_PARAM = 1.10


def measure(params) -> list[dict]:
  """Bytes per parameter of each configuration on float32 ``params``.

  Returns one row per configuration: total bytes of weights (``weights``)
  and optimizer state (``state``), bytes per parameter over the whole model
  (``bytes_per_param``), and over the weight matrices alone
  (``bytes_per_weight``: each matrix's stored weight plus the state arrays
  that belong to it, full or factored, per matrix element; biases and
  per-tensor scalars excluded), and the dtypes of those arrays.
  """
  n = harness.param_count(params)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  matrices = [
    jax.tree_util.keystr(path) for path, x in leaves if np.ndim(x) >= 2
  ]
  n_w = harness.param_count([x for _, x in leaves if np.ndim(x) >= 2])

  def of_matrices(tree):
    """The arrays of ``tree`` that belong to a matrix (by their path)."""
    return [
      x
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
      if np.ndim(x) >= 1
      and jax.tree_util.keystr(path).endswith(tuple(matrices))
    ]

  rows = []
  for name, (make_tx, fmt, additive) in CONFIGS.items():
    weights, tx = harness.stored_for_training(
      params, make_tx(), fmt, additive=additive
    )
    state = tx.init(weights["params"])
    per_matrix = of_matrices((weights, state))
    rows.append(
      dict(
        config=name,
        weights=harness.tree_bytes(weights),
        state=harness.tree_bytes(state),
        bytes_per_param=harness.tree_bytes((weights, state)) / n,
        bytes_per_weight=harness.tree_bytes(per_matrix) / n_w,
        weight_dtypes=sorted({str(x.dtype) for x in per_matrix}),
      )
    )
    del weights, state, per_matrix
  return rows


def gpt2_small_params(
  seed: int = 0,
  *,
  vocab: int = 50257,
  context: int = 1024,
  width: int = 768,
  depth: int = 12,
) -> dict:
  """A parameter tree shaped like GPT-2 small (124,439,808 parameters).

  Token embedding (tied with the output layer, as in GPT-2), position
  embedding, ``depth`` blocks of LayerNorm, attention (``c_attn``: width x
  3 width, ``c_proj``: width x width) and MLP (width x 4 width and back) with
  zero biases, and a final LayerNorm; weights N(0, 0.02), LayerNorm scales 1
  and offsets 0, as GPT-2 initialises them.
  """
  keys = iter(jax.random.split(jax.random.key(seed), 2 + 4 * depth))

  def normal(shape):
    return 0.02 * jax.random.normal(next(keys), shape)

  def layer_norm():
    return {"scale": jnp.ones(width), "bias": jnp.zeros(width)}

  def dense(m, n):
    return {"kernel": normal((m, n)), "bias": jnp.zeros(n)}

  params = {
    "wte": normal((vocab, width)),
    "wpe": normal((context, width)),
    "ln_f": layer_norm(),
  }
  for i in range(depth):
    params[f"h{i:02d}"] = {
      "ln_1": layer_norm(),
      "attn": {
        "c_attn": dense(width, 3 * width),
        "c_proj": dense(width, width),
      },
      "ln_2": layer_norm(),
      "mlp": {
        "c_fc": dense(width, 4 * width),
        "c_proj": dense(4 * width, width),
      },
    }
  return params


MODELS = {
  "digits MLP 64-128-10": lambda: harness.mlp_params((64, 128, 10)),
  "MLP 784-1024-1024-1024-10": lambda: harness.mlp_params(
    (784, 1024, 1024, 1024, 10)
  ),
  "GPT-2 small (124M)": gpt2_small_params,
}
GPT2 = "GPT-2 small (124M)"


def markdown_body(results: dict) -> str:
  """The tables below the machine record (from the JSON's contents)."""
  lines = [
    "Bytes of the stored weights (LNS codes and their float32 per-tensor "
    "scales, or float32 weights) plus the optimizer state, summed from the "
    "arrays' `.nbytes`, divided by the number of parameters. `per weight` "
    "counts only the weight-matrix elements and the state arrays that "
    "belong to them, full or factored (no biases, no per-tensor scalars). "
    "Biases are float32 and trained by `optax.adam` in every Madam variant "
    "(`with_additive_fallback`). `factored v`: a statistic per row and per "
    "column of each matrix whose two largest dimensions are at least 128 "
    "(Adafactor's rule), the full second moment elsewhere.",
    "",
  ]
  gpt2 = results["results"].get(GPT2)
  if gpt2 is not None:
    row = next(
      r for r in gpt2["rows"] if r["config"] == "lns_madam int8 + factored v"
    )
    verdict = (
      "meets" if row["bytes_per_param"] <= GOAL_BYTES_PER_PARAM else ("misses")
    )
    lines += [
      f"int8 codes with a factored second moment on {GPT2}: "
      f"{row['bytes_per_param']:.3f} bytes per parameter, biases "
      f"(Adam, 12 B each) included: {verdict} the goal of "
      f"{GOAL_BYTES_PER_PARAM:.2f}.",
      "",
    ]
  for model, res in results["results"].items():
    lines += [
      f"## {model} ({res['parameters']} parameters)",
      "",
      "| configuration | weights B | state B | bytes/param | "
      "bytes/weight | dtypes per weight |",
      "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
      lines.append(
        f"| {r['config']} | {r['weights']} | {r['state']} | "
        f"{r['bytes_per_param']:.3f} | {r['bytes_per_weight']:.2f} "
        f"| {', '.join(r['weight_dtypes'])} |"
      )
    lines.append("")
  return "\n".join(lines)


REPORT = harness.Report(
  "LNS-Madam: training memory per parameter", markdown_body
)


def parse_args(argv=None):
  return harness.parse_args(
    harness.argument_parser(__doc__, "lns_memory"), argv, __file__
  )


def main(argv=None, log=harness.progress) -> dict:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  models = dict(list(MODELS.items())[:1]) if args.quick else MODELS
  results = {"machine": harness.machine_record(args.command), "results": {}}
  for model, build in models.items():
    log(f"{model} ...")
    params = build()
    results["results"][model] = dict(
      parameters=harness.param_count(params), rows=measure(params)
    )
    del params
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
