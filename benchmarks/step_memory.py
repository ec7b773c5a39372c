"""Memory of a whole training step: int8 LNS-Madam against float optimizers.

``lns_memory.py`` counts what training keeps between steps (weights plus
optimizer state, "at rest"). A step needs more: the decoded weights, the
activations and the gradients. This script compiles one training step --
loss, gradient, optimizer update and ``optax.apply_updates`` in one
``jax.jit`` with the weights and the state donated -- on abstract inputs
(``jax.ShapeDtypeStruct``: nothing of the model's size is allocated) and
reads XLA's ``compiled.memory_analysis()``: arguments + outputs - aliased
(donated) + temporaries, the bytes the step needs, per parameter.

The model is a GPT-2-shaped decoder written in plain JAX (pre-LayerNorm
blocks of causal attention and a 4x MLP with GELU, learned positions,
untied output layer): width 768, vocabulary 50,257, sequence 128, batch 1,
12 blocks (162M parameters) and 24 (247M). Biases are zero-initialised and
trained by ``optax.adam`` in every Madam configuration
(``with_additive_fallback``'s rule); LayerNorm scales are codes like the
matrices. Configurations:

* ``adam``: ``optax.adam(1e-3)``, float32 weights;
* ``madam``, ``madam factored``: ``madam_optax.madam()`` (``factored=True``);
* ``lns factored``: int8 codes, ``lns_madam(fmt, factored=True)``,
  ``lns_value_and_grad`` (float32), blocks unrolled: the issue's path;
* ``lns bf16 v``: the same with ``state_dtype=jnp.bfloat16``, not factored;
* the levers on ``lns factored``: ``+ bf16 compute``
  (``lns_value_and_grad(compute_dtype=jnp.bfloat16)``); ``scanned`` (blocks
  stacked and run by ``jax.lax.scan``, each decoded inside the scan,
  ``madam_examples.lns_layers.train_step(release=False)``: whole gradient
  tree); ``scanned + release`` (each block's update applied as soon as its
  gradient exists, ``release=True``), in float32 and in bfloat16
  (the recommended path).

``--budget-gib B`` also finds, for ``adam``, ``madam factored`` and the
recommended path, the largest decoder (number of blocks) whose step needs
at most ``B`` GiB (compiled, abstract), then runs ``--run-steps`` real steps
of the recommended path at its size and records the process's peak
resident memory (``resource.getrusage``).

Usage::

  python benchmarks/step_memory.py              # writes results/step_memory.{md,json}
  python benchmarks/step_memory.py --quick      # a 2-block width-128 decoder, prints only
  python benchmarks/step_memory.py --budget-gib 8 --name step_memory_budget

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Any, NamedTuple

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

from madam_examples import cli
from madam_examples import lns_layers
import madam_optax

INT8 = madam_optax.LNSFormat.spanning(127)
BF16 = jnp.bfloat16
GOAL = 3.0  # bytes per parameter, whole step, GPT-2-small-shaped decoder


class Shape(NamedTuple):
  """A decoder's size."""

  depth: int = 12
  width: int = 768
  vocab: int = 50257
  seq: int = 128
  batch: int = 1

  @property
  def heads(self) -> int:
    return max(1, self.width // 64)


# ------------------------------------------------------------- the decoder


def _layer_norm(p: dict, x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + 1e-5)
  return y * p["scale"].astype(jnp.float32) + p["bias"]


def _dense(p: dict, x: jax.Array) -> jax.Array:
  """``x @ kernel + bias``, in the kernel's dtype, accumulated in float32."""
  k = p["kernel"]
  y = jnp.matmul(x.astype(k.dtype), k, preferred_element_type=jnp.float32)
  return y + p["bias"]


def block(p: dict, x: jax.Array) -> jax.Array:
  """One pre-LayerNorm block: causal self-attention, then a GELU MLP."""
  b, t, d = x.shape
  heads = max(1, d // 64)
  qkv = _dense(p["attn"]["c_attn"], _layer_norm(p["ln_1"], x))
  q, k, v = (
    z.reshape(b, t, heads, d // heads) for z in jnp.split(qkv, 3, axis=-1)
  )
  scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // heads)
  causal = jnp.tril(jnp.ones((t, t), bool))
  scores = jnp.where(causal, scores, -1e9)
  att = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(scores, -1), v)
  x = x + _dense(p["attn"]["c_proj"], att.reshape(b, t, d))
  h = jax.nn.gelu(_dense(p["mlp"]["c_fc"], _layer_norm(p["ln_2"], x)))
  return x + _dense(p["mlp"]["c_proj"], h)


def embed(other: dict, rows: jax.Array, tokens: jax.Array) -> jax.Array:
  """The looked-up token vectors plus the positions', in float32."""
  return rows.astype(jnp.float32) + other["wpe"][: rows.shape[1]].astype(
    jnp.float32
  )


def final(other: dict, h: jax.Array) -> jax.Array:
  return _layer_norm(other["ln_f"], h)


def loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (float32)."""
  return jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  )


def token_ids(tokens: jax.Array) -> jax.Array:
  return tokens[:, :-1]


MODEL = lns_layers.Decoder(embed, block, final, loss, token_ids)


def chunks_of(vocab: int, most: int = 2048) -> int:
  """The fewest equal chunks of at most ``most`` entries (50257: 29 of 1733)."""
  return next(
    k for k in range(1, vocab + 1) if vocab % k == 0 and vocab // k <= most
  )


def _ln(d: int) -> dict:
  return {"scale": ("ones", (d,)), "bias": ("zeros", (d,))}


def _dense_spec(m: int, n: int) -> dict:
  return {"kernel": ("normal", (m, n)), "bias": ("zeros", (n,))}


def _is_spec(x: Any) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


def _stack(tree: Any, n: int) -> Any:
  return jax.tree.map(lambda x: (x[0], (n,) + x[1]), tree, is_leaf=_is_spec)


def block_spec(d: int) -> dict:
  return {
    "ln_1": _ln(d),
    "attn": {"c_attn": _dense_spec(d, 3 * d), "c_proj": _dense_spec(d, d)},
    "ln_2": _ln(d),
    "mlp": {"c_fc": _dense_spec(d, 4 * d), "c_proj": _dense_spec(4 * d, d)},
  }


def layered_spec(s: Shape) -> dict:
  """``{part: {leaf: (init, shape)}}`` of ``lns_layers.PARTS``."""
  d, k = s.width, chunks_of(s.vocab)
  c = s.vocab // k
  return {
    "tokens": ("normal", (k, c, d)),
    "layers": _stack(block_spec(d), s.depth),
    "output": ("normal", (k, d, c)),
    "other": {"wpe": ("normal", (s.seq, d)), "ln_f": _ln(d)},
  }


def flat_spec(s: Shape) -> dict:
  """One tree, whole vocabulary matrices and one subtree per block ``hNN``."""
  d = s.width
  flat = {
    "wte": ("normal", (s.vocab, d)),
    "wpe": ("normal", (s.seq, d)),
    "ln_f": _ln(d),
    "out": ("normal", (d, s.vocab)),
  }
  for i in range(s.depth):
    flat[f"h{i:02d}"] = block_spec(d)
  return flat


def unrolled_loss(params: dict, tokens: jax.Array) -> jax.Array:
  """The decoder's loss on a :func:`flat_spec` tree, the blocks unrolled."""
  rows = jnp.take(params["wte"], token_ids(tokens), axis=0)
  h = embed(params, rows, tokens)
  for name in sorted(k for k in params if k.startswith("h")):
    h = block(params[name], h)
  f = final(params, h)
  w = params["out"]
  return loss(jnp.matmul(f.astype(w.dtype), w).astype(jnp.float32), tokens)


def init_params(spec: Any, seed: int = 0) -> Any:
  """Concrete float32 weights for a spec: N(0, 0.02), LN scales 1, biases 0."""
  leaves, treedef = jax.tree.flatten(spec, is_leaf=_is_spec)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  made = []
  for (kind, shape), key in zip(leaves, keys):
    if kind == "normal":
      made.append(0.02 * jax.random.normal(key, shape))
    else:
      made.append(jnp.full(shape, 1.0 if kind == "ones" else 0.0))
  return jax.tree.unflatten(treedef, made)


# ---------------------------------------------- abstract weights and states


def abstract_weights(spec: Any, fmt: Any = None) -> tuple[Any, Any]:
  """``(weights, max_magnitudes)`` as ``ShapeDtypeStruct``s.

  With ``fmt``, every leaf that is not zero-initialised is codes (one scale
  per tensor, per block when stacked); biases stay float32 (scale ``None``).
  """

  def leaf(spec_leaf, stacked):
    kind, shape = spec_leaf
    if fmt is None or kind == "zeros":
      return jax.ShapeDtypeStruct(shape, jnp.float32), None
    scale_shape = shape[:1] + (1,) * (len(shape) - 1) if stacked else ()
    scale = jax.ShapeDtypeStruct(scale_shape, jnp.float32)
    return jax.ShapeDtypeStruct(shape, fmt.dtype), scale

  def part(tree, stacked):
    flat, treedef = jax.tree.flatten(tree, is_leaf=_is_spec)
    pairs = [leaf(x, stacked) for x in flat]
    return (
      jax.tree.unflatten(treedef, [p[0] for p in pairs]),
      jax.tree.unflatten(treedef, [p[1] for p in pairs]),
    )

  if set(spec) == set(lns_layers.PARTS):
    pairs = {k: part(v, k in lns_layers.STACKED) for k, v in spec.items()}
    return {k: v[0] for k, v in pairs.items()}, {
      k: v[1] for k, v in pairs.items()
    }
  return part(spec, False)


def labels_of(spec: Any) -> Any:
  """``with_additive_fallback``'s labels: zero-initialised leaves additive."""
  return jax.tree.map(
    lambda x: "additive" if x[0] == "zeros" else "multiplicative",
    spec,
    is_leaf=_is_spec,
  )


def with_fallback(spec: Any, tx: optax.GradientTransformation):
  """``tx`` for the leaves Madam moves, ``optax.adam(1e-3)`` for the rest."""
  labels = labels_of(spec)
  return optax.partition(
    {"multiplicative": tx, "additive": optax.adam(1e-3)}, lambda _: labels
  )


# ------------------------------------------------------------------ steps


def float_step(tx):
  def step(params, state, tokens):
    value, grads = jax.value_and_grad(unrolled_loss)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  return step


def lns_step(tx, compute_dtype=None):
  def step(codes, state, max_magnitudes, tokens):
    value, grads = madam_optax.lns_value_and_grad(
      unrolled_loss, max_magnitudes, INT8, compute_dtype=compute_dtype
    )(codes, tokens)
    updates, state = tx.update(grads, state, codes)
    return optax.apply_updates(codes, updates), state, value

  return step


def _unstacked(tree: Any) -> Any:
  """One tensor's spec of a stacked part."""
  return jax.tree.map(lambda x: (x[0], x[1][1:]), tree, is_leaf=_is_spec)


def layered_txs(spec: dict, make_tx) -> dict:
  """One transform per part (a stacked part's: one tensor's, ``vmap``-ped)."""
  return {
    part: with_fallback(
      _unstacked(sub) if part in lns_layers.STACKED else sub, make_tx()
    )
    for part, sub in spec.items()
  }


def _factored_lns():
  return madam_optax.lns_madam(INT8, factored=True)


# name -> (kind, factory); kinds: float (optimizer on float32 weights), lns
# (unrolled, compute dtype), layered (compute dtype, release).
CONFIGS: dict[str, tuple] = {
  "adam": ("float", lambda: optax.adam(1e-3), False),
  "madam": ("float", madam_optax.madam, True),
  "madam factored": ("float", lambda: madam_optax.madam(factored=True), True),
  "adam, scanned": ("float scanned", lambda: optax.adam(1e-3), False),
  "madam factored, scanned": (
    "float scanned",
    lambda: madam_optax.madam(factored=True),
    True,
  ),
  "lns factored": ("lns", _factored_lns, None),
  "lns bf16 v": (
    "lns",
    lambda: madam_optax.lns_madam(INT8, state_dtype=BF16),
    None,
  ),
  "lns factored + bf16 compute": ("lns", _factored_lns, BF16),
  "lns factored, scanned": ("layered", _factored_lns, (None, False)),
  "lns factored, scanned + release": ("layered", _factored_lns, (None, True)),
  "lns factored, scanned + bf16 compute": (
    "layered",
    _factored_lns,
    (BF16, False),
  ),
  "lns factored, scanned + release + bf16 compute": (
    "layered",
    _factored_lns,
    (BF16, True),
  ),
}
RECOMMENDED = "lns factored, scanned + release + bf16 compute"
# Scanned (compiles in the same time at any depth), each at its best.
BUDGET_CONFIGS = ("adam, scanned", "madam factored, scanned", RECOMMENDED)


def compiled_step(name: str, s: Shape):
  """``(jitted step, abstract arguments, parameter count)`` of a config."""
  kind, make_tx, option = CONFIGS[name]
  spec = layered_spec(s)
  tokens = jax.ShapeDtypeStruct((s.batch, s.seq + 1), jnp.int32)
  if kind == "float scanned":
    txs = {
      part: with_fallback(sub, make_tx()) if option else make_tx()
      for part, sub in spec.items()
    }
    weights, _ = abstract_weights(spec)
    state = jax.eval_shape(lambda w: {k: txs[k].init(w[k]) for k in w}, weights)

    def step(params, state, tokens):
      value, grads = jax.value_and_grad(lns_layers.loss_of_weights(MODEL))(
        params, tokens
      )
      new_params, new_state = {}, {}
      for k in params:
        updates, new_state[k] = txs[k].update(grads[k], state[k], params[k])
        new_params[k] = optax.apply_updates(params[k], updates)
      return new_params, new_state, value

    args = (weights, state, tokens)
  elif kind == "layered":
    txs = layered_txs(spec, make_tx)
    codes, scales = abstract_weights(spec, INT8)
    state = jax.eval_shape(lambda c: lns_layers.init(txs, c), codes)
    dtype, release = option
    step = lns_layers.train_step(
      MODEL, txs, INT8, compute_dtype=dtype, release=release
    )
    args = (codes, state, scales, tokens)
  else:
    flat = flat_spec(s)
    if kind == "float":
      tx = with_fallback(flat, make_tx()) if option else make_tx()
      weights, _ = abstract_weights(flat)
      args = (weights, jax.eval_shape(tx.init, weights), tokens)
      step = float_step(tx)
    else:
      tx = with_fallback(flat, make_tx())
      codes, scales = abstract_weights(flat, INT8)
      args = (codes, jax.eval_shape(tx.init, codes), scales, tokens)
      step = lns_step(tx, option)
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(args[0]))
  return jax.jit(step, donate_argnums=(0, 1)), args, n


def measure(name: str, s: Shape) -> dict:
  """Bytes of one config's compiled step and at rest, in all and per parameter."""
  step, args, n = compiled_step(name, s)
  start = time.perf_counter()
  m = step.lower(*args).compile().memory_analysis()
  at_rest = harness.tree_bytes(args[:-1])  # weights, state (and scales)
  whole = (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.temp_size_in_bytes
  )
  return dict(
    config=name,
    parameters=n,
    arguments=int(m.argument_size_in_bytes),
    outputs=int(m.output_size_in_bytes),
    aliased=int(m.alias_size_in_bytes),
    temporaries=int(m.temp_size_in_bytes),
    whole_step=int(whole),
    at_rest=int(at_rest),
    whole_per_param=whole / n,
    temporaries_per_param=m.temp_size_in_bytes / n,
    at_rest_per_param=at_rest / n,
    compile_s=round(time.perf_counter() - start, 1),
  )


# -------------------------------------------------- budget and a real run


def largest_depth(name: str, s: Shape, budget: float, log) -> dict:
  """The most blocks whose step needs at most ``budget`` bytes.

  Beyond a couple of blocks the step's bytes grow linearly with the depth
  (one block more of weights, state and, unscanned, activations), so the
  compiles at 2 and 4 blocks predict the answer; a scanned step at 1 block
  can need more than at 2 (XLA unrolls a scan of length 1), so depth 1 is
  not used for the prediction. The prediction is then checked by compiling
  around it, and a bisection between a depth that fits and one that does
  not settles the rest, so a wrong prediction costs compiles, not the answer.
  """
  rows: dict[int, dict] = {}

  def fits(depth: int) -> bool:
    if depth not in rows:
      rows[depth] = measure(name, s._replace(depth=depth))
      gib = rows[depth]["whole_step"] / 2**30
      log(f"  {name}: {depth} blocks need {gib:.2f} GiB")
    return rows[depth]["whole_step"] <= budget

  if not fits(1):
    return dict(
      config=name,
      depth=0,
      parameters=0,
      whole_step=0,
      next_whole_step=rows[1]["whole_step"],
    )
  lo, hi = 1, None  # lo fits; hi, once known, does not
  if fits(2):
    lo = 2
    fits(4)
    per_block = (rows[4]["whole_step"] - rows[2]["whole_step"]) / 2
    guess = (
      2
      if per_block <= 0
      else 2 + int((budget - rows[2]["whole_step"]) // per_block)
    )
    guess = max(guess, 2)
    for depth in (4, guess, guess + 1):
      if fits(depth):
        lo = max(lo, depth)
      elif hi is None or depth < hi:
        hi = depth
    while hi is None:  # the prediction was low: double until one fails
      if fits(2 * lo):
        lo = 2 * lo
      else:
        hi = 2 * lo
  else:
    hi = 2
  over = [d for d in rows if d > lo and rows[d]["whole_step"] > budget]
  hi = min(over) if over else lo + 1
  fits(hi)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return dict(rows[lo], depth=lo, next_whole_step=rows[hi]["whole_step"])


def encode_stacked(spec: dict, seed: int = 0) -> tuple[dict, dict]:
  """Codes and scales of fresh weights, one tensor made and encoded at a time.

  A stacked part's tensors are encoded alone (a scale each) and written into
  the part's stacked buffers in place (a donated update), so its codes never
  exist twice; its scales are shaped ``(n, 1, ...)`` to broadcast against
  the codes.
  """
  put = jax.jit(
    lambda buf, x, i: jax.tree.map(lambda b, v: b.at[i].set(v), buf, x),
    donate_argnums=0,
  )
  codes, scales = {}, {}
  for p, sub in spec.items():
    if p not in lns_layers.STACKED:
      codes[p], scales[p] = madam_optax.lns_encode_tree(
        init_params(sub, seed), INT8
      )
      continue
    n = jax.tree.leaves(sub, is_leaf=_is_spec)[0][1][0]
    one = _unstacked(sub)
    stacked, part_scales = None, []
    for i in range(n):
      c, m = madam_optax.lns_encode_tree(init_params(one, seed + 1 + i), INT8)
      if stacked is None:
        stacked = jax.tree.map(
          lambda x, n=n: jnp.zeros((n,) + x.shape, x.dtype), c
        )
      stacked = put(stacked, c, i)
      part_scales.append(m)
      del c
    codes[p] = stacked
    scales[p] = jax.tree.map(
      lambda c, *xs: (
        None
        if xs[0] is None
        else jnp.stack(xs).reshape((len(xs),) + (1,) * (c.ndim - 1))
      ),
      codes[p],
      *part_scales,
      is_leaf=lambda x: x is None,
    )
  return codes, scales


def _status_gib(field: str) -> float | None:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 2**20  # kB
  except OSError:
    pass
  return None


def peak_rss_gib() -> float:
  """This process's peak resident memory (``VmHWM``; else ``getrusage``)."""
  peak = _status_gib("VmHWM")
  if peak is None:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return peak


def reset_peak_rss() -> bool:
  """Restarts ``VmHWM`` from the current resident memory (Linux 4.0+)."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def real_run(s: Shape, steps: int, log) -> dict:
  """``steps`` real steps of the recommended path; peak RSS before and after.

  The weights are made and encoded one tensor at a time, so no more than
  one tensor's float32 weights exist at once before the codes are made.
  """
  spec = layered_spec(s)
  txs = layered_txs(spec, _factored_lns)
  step = lns_layers.train_step(MODEL, txs, INT8, compute_dtype=BF16)
  rss_start = peak_rss_gib()
  codes, scales = encode_stacked(spec)
  state = lns_layers.init(txs, codes)
  rss_init = peak_rss_gib()
  log(f"  initialised: peak RSS {rss_init:.2f} GiB")
  rss_ready = _status_gib("VmRSS")
  # From here on the peak is the steps' own (where the OS allows a reset).
  steps_only = reset_peak_rss()
  jitted = jax.jit(step, donate_argnums=(0, 1))
  rng = np.random.default_rng(0)
  losses, seconds = [], []
  for _ in range(steps):
    tokens = jnp.asarray(
      rng.integers(0, s.vocab, (s.batch, s.seq + 1)), jnp.int32
    )
    start = time.perf_counter()
    codes, state, loss = jitted(codes, state, scales, tokens)
    losses.append(float(loss))
    seconds.append(round(time.perf_counter() - start, 2))
    log(f"  step {len(losses)}: loss {losses[-1]:.3f}, {seconds[-1]} s")
  return dict(
    depth=s.depth,
    parameters=sum(x.size for x in jax.tree.leaves(codes)),
    steps=steps,
    losses=losses,
    step_seconds=seconds,
    peak_rss_gib_at_start=rss_start,
    peak_rss_gib_after_init=rss_init,
    peak_rss_gib=peak_rss_gib(),
    peak_rss_is_the_steps_own=steps_only,
    rss_gib_before_the_steps=rss_ready,
    code_dtypes=sorted(
      {str(x.dtype) for x in jax.tree.leaves(codes["layers"])}
    ),
  )


# ------------------------------------- the same training result as today

TRAIN_SHAPE = Shape(depth=2, width=64, vocab=96, seq=32, batch=16)
TRAIN_PATHS = {
  "lns factored (today's step)": "lns factored",
  RECOMMENDED: RECOMMENDED,
}


def _text_batches(ids, s: Shape, n: int, seed: int) -> list[jax.Array]:
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(ids) - s.seq - 1, (n, s.batch))
  return [
    jnp.asarray(np.stack([ids[i : i + s.seq + 1] for i in row]), jnp.int32)
    for row in starts
  ]


def training_comparison(
  steps: int,
  seeds=(0, 1, 2),
  s: Shape = TRAIN_SHAPE,
  learning_rate: float = 0.05,
  log=print,
) -> dict:
  """Validation perplexity of a small decoder trained by each path.

  Python's own docstrings (``madam_examples.data``, 90 % to train, the rest
  to validate; 96 characters), ``steps`` steps of ``lns_madam(int8,
  factored=True)`` at ``learning_rate`` on every seed: today's int8 step
  (whole vocabulary matrices, ``lns_value_and_grad`` of the unrolled
  model) and the recommended layer-at-a-time step. Each path's step is
  compiled once and trains every seed.
  """
  from madam_examples import data  # pylint: disable=import-outside-toplevel

  text = data.load_stdlib_text(max_chars=300_000)  # the last 10 % held out
  valid = _text_batches(text.valid, s, 8, 12345)

  def make():
    return madam_optax.lns_madam(
      INT8, learning_rate=learning_rate, factored=True
    )

  rows = []
  for label, name in TRAIN_PATHS.items():
    if CONFIGS[name][0] == "layered":
      spec = layered_spec(s)
      txs = layered_txs(spec, make)
      step = lns_layers.train_step(MODEL, txs, INT8, compute_dtype=BF16)
      evaluate = lns_layers.loss_of_weights(MODEL)

      def start(seed, spec=spec, txs=txs):
        codes, scales = encode_stacked(spec, seed)
        return codes, lns_layers.init(txs, codes), scales
    else:
      spec = flat_spec(s)
      tx = with_fallback(spec, make())
      step = lns_step(tx)
      evaluate = unrolled_loss

      def start(seed, spec=spec, tx=tx):
        codes, scales = madam_optax.lns_encode_tree(
          init_params(spec, seed), INT8
        )
        return codes, tx.init(codes), scales

    jitted = jax.jit(step, donate_argnums=(0, 1))
    valid_loss = jax.jit(
      lambda c, m, b, evaluate=evaluate: evaluate(
        madam_optax.lns_decode_tree(c, m, INT8), b
      )
    )
    perplexities = []
    for seed in seeds:
      codes, state, scales = start(seed)
      for batch in _text_batches(text.train, s, steps, seed):
        codes, state, _ = jitted(codes, state, scales, batch)
      losses = [float(valid_loss(codes, scales, b)) for b in valid]
      perplexities.append(float(np.exp(np.mean(losses))))
      log(f"  {label}, seed {seed}: perplexity {perplexities[-1]:.3f}")
    rows.append(
      dict(
        path=label,
        perplexity=perplexities,
        mean=float(np.mean(perplexities)),
        std=float(np.std(perplexities)),
      )
    )
  return dict(
    shape=s._asdict(),
    steps=steps,
    seeds=list(seeds),
    learning_rate=learning_rate,
    rows=rows,
  )


# ------------------------------------------------------------- the report

SHAPES = {
  "GPT-2-small-shaped decoder (12 blocks)": (Shape(depth=12), tuple(CONFIGS)),
  "24-block decoder": (
    Shape(depth=24),
    (
      "adam",
      "madam",
      "madam factored",
      "lns factored",
      "lns bf16 v",
      RECOMMENDED,
    ),
  ),
}
QUICK_SHAPE = Shape(depth=2, width=128, vocab=300, seq=16)
QUICK_CONFIGS = ("adam", "lns factored", RECOMMENDED)


def markdown_body(results: dict) -> str:
  """The tables below the machine record (from the JSON's contents)."""
  lines = [
    "One jitted training step (loss, gradient, optimizer update, "
    "`optax.apply_updates`; weights and optimizer state donated), compiled "
    "on abstract inputs; XLA's `compiled.memory_analysis()`: `whole step` = "
    "arguments + outputs - aliased + temporaries; `at rest` = the weights "
    "(codes and their scales, or float32) plus the optimizer state. Bytes "
    "per parameter. Batch 1, sequence 128, width 768, vocabulary 50,257 "
    "(untied output matrix). Biases float32, trained by `optax.adam` in "
    "every Madam configuration. `scanned`: blocks stacked, run by "
    "`jax.lax.scan` and decoded inside it, vocabulary matrices as 29 "
    "tensors of 1733 entries (`madam_examples.lns_layers`); `release`: each "
    "tensor's update applied as soon as its gradient exists; `bf16 "
    "compute`: weights decoded to, and gradients in, bfloat16.",
    "",
  ]
  for model, res in results["results"].items():
    rows = res["rows"]
    lines += [
      f"## {model} ({rows[0]['parameters']:,} parameters)",
      "",
      "| configuration | whole step B/param | of which temporaries | at rest "
      "B/param | whole step GiB | compile s |",
      "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
      star = "**" if r["config"] == RECOMMENDED else ""
      lines.append(
        f"| {star}{r['config']}{star} | {star}{r['whole_per_param']:.2f}{star}"
        f" | {r['temporaries_per_param']:.2f} | {r['at_rest_per_param']:.3f}"
        f" | {r['whole_step'] / 2**30:.2f} | {r['compile_s']} |"
      )
    lines.append("")
  budget = results.get("budget")
  if budget:
    lines += [
      f"## The largest decoder whose step fits {budget['gib']} GiB",
      "",
      "Width 768, vocabulary 50,257, sequence 128, batch 1; blocks stacked "
      "(the float optimizers at their best: scanned, whole gradient).",
      "",
      "| configuration | blocks | parameters | whole step GiB | one more block GiB |",
      "|---|---:|---:|---:|---:|",
    ]
    for r in budget["rows"]:
      lines.append(
        f"| {r['config']} | {r['depth']} | {r.get('parameters', 0):,} | "
        f"{r.get('whole_step', 0) / 2**30:.2f} | "
        f"{r.get('next_whole_step', 0) / 2**30:.2f} |"
      )
    run = budget.get("run")
    if run:
      during = (
        "peak resident memory of the process during the steps"
        if run.get("peak_rss_is_the_steps_own")
        else "peak resident memory of the process (making the codes included)"
      )
      before = run.get("rss_gib_before_the_steps")
      lines += [
        "",
        f"Run: {run['steps']} steps of `{RECOMMENDED}` at {run['depth']} "
        f"blocks ({run['parameters']:,} parameters; the blocks' leaves "
        f"{', '.join(run['code_dtypes'])}): {during} "
        f"{run['peak_rss_gib']:.2f} GiB"
        + (
          f" (resident before the first step {before:.2f} GiB"
          if before is not None
          else " ("
        )
        + f"; peak while making the codes and state "
        f"{run['peak_rss_gib_after_init']:.2f} GiB; "
        f"{run['peak_rss_gib_at_start']:.2f} GiB at start); losses "
        f"{', '.join(f'{x:.3f}' for x in run['losses'])}; seconds per step "
        f"{', '.join(str(x) for x in run['step_seconds'])}.",
      ]
    lines.append("")
  training = results.get("training")
  if training:
    sh = training["shape"]
    lines += [
      "## The same training result as today's step",
      "",
      f"A {sh['depth']}-block decoder (width {sh['width']}, the 96 "
      f"characters of Python's docstrings, sequence {sh['seq']}, batch "
      f"{sh['batch']}), {training['steps']} steps of `lns_madam(int8, "
      f"factored=True)` at {training['learning_rate']:g}; validation "
      f"perplexity, seeds {', '.join(map(str, training['seeds']))}.",
      "",
      "| step | perplexity per seed | mean | std |",
      "|---|---|---:|---:|",
    ]
    for r in training["rows"]:
      lines.append(
        f"| {r['path']} | {', '.join(f'{x:.3f}' for x in r['perplexity'])}"
        f" | {r['mean']:.3f} | {r['std']:.3f} |"
      )
    lines.append("")
  return "\n".join(lines)


REPORT = harness.Report(
  "A whole training step's memory: int8 LNS-Madam and float optimizers",
  markdown_body,
)


def parse_args(argv=None):
  parser = harness.argument_parser(__doc__, "step_memory")
  parser.add_argument(
    "--budget-gib",
    type=cli.positive_float,
    default=None,
    help="find the largest decoder whose step fits this many GiB, and run it",
  )
  parser.add_argument(
    "--run-steps",
    type=cli.positive_int,
    default=3,
    help="real steps of the budget run",
  )
  parser.add_argument(
    "--no-run", action="store_true", help="skip the budget's real run"
  )
  parser.add_argument(
    "--no-table", action="store_true", help="only the budget (no tables)"
  )
  parser.add_argument(
    "--train-steps",
    type=cli.nonnegative_int,
    default=0,
    help="also train a small decoder this many steps by today's int8 step "
    "and the recommended one, 3 seeds, and compare validation perplexity",
  )
  parser.add_argument(
    "--configs",
    default=None,
    help="semicolon-separated configurations to measure (default: all)",
  )
  parser.add_argument(
    "--depths",
    default=None,
    help="comma-separated block counts to measure (default: 12 and 24)",
  )
  return harness.parse_args(parser, argv, __file__)


def main(argv=None, log=harness.progress) -> dict:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  results: dict[str, Any] = {
    "machine": harness.machine_record(args.command),
    "results": {},
  }
  shapes = (
    {"quick decoder (2 blocks, width 128)": (QUICK_SHAPE, QUICK_CONFIGS)}
    if args.quick
    else SHAPES
  )
  if args.depths:
    shapes = {
      f"decoder, {d} blocks": (Shape(depth=int(d)), tuple(CONFIGS))
      for d in args.depths.split(",")
    }
  if args.configs:
    chosen = args.configs.split(";")
    unknown = sorted(set(chosen) - set(CONFIGS))
    if unknown:
      raise ValueError(f"unknown configurations {unknown}; see CONFIGS")
    shapes = {m: (sh, tuple(chosen)) for m, (sh, _) in shapes.items()}
  if not args.no_table:
    for model, (shape, names) in shapes.items():
      rows = []
      for name in names:
        rows.append(measure(name, shape))
        log(
          f"{model}, {name}: {rows[-1]['whole_per_param']:.2f} B/param "
          f"(temporaries {rows[-1]['temporaries_per_param']:.2f})"
        )
      results["results"][model] = dict(shape=shape._asdict(), rows=rows)
  if args.budget_gib is not None:
    base = QUICK_SHAPE if args.quick else Shape()
    budget_bytes = args.budget_gib * 2**30
    rows = [largest_depth(n, base, budget_bytes, log) for n in BUDGET_CONFIGS]
    budget: dict[str, Any] = dict(gib=args.budget_gib, rows=rows)
    depth = rows[-1]["depth"]
    if not args.no_run and depth > 0:
      log(f"running {args.run_steps} steps at {depth} blocks ...")
      budget["run"] = real_run(base._replace(depth=depth), args.run_steps, log)
    results["budget"] = budget
  if args.train_steps:
    results["training"] = training_comparison(args.train_steps, log=log)
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
