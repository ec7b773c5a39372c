"""The optimizers: ``madam`` and ``lns_madam``, chains of the composable parts."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from madam_optax._src import fused_madam
from madam_optax._src import lns
from madam_optax._src import lns_level_step as lns_level_step_lib
from madam_optax._src import validation
from madam_optax._src.factored_second_moment import (
  scale_by_factored_second_moment,
)
from madam_optax._src.magnitude_bound import clip_weight_magnitude
from madam_optax._src.multiplicative_step import multiplicative_step


def madam(
  learning_rate: optax.ScalarOrSchedule = 0.01,
  *,
  p_scale: float = 3.0,
  g_bound: float = 10.0,
  b2: float = 0.999,
  state_dtype: Any = None,
  max_magnitude: float | None = None,
  factored: bool = False,
  min_dim_size_to_factor: int = 128,
  b1: float | None = None,
  mu_dtype: Any = None,
  warn_zero_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Madam: the multiplicative version of Adam.

  For each parameter tensor :math:`w` with gradient :math:`g`, at step
  :math:`t = 1, 2, \dots`:

  .. math::

    w_{max} &= p_{scale} \sqrt{\mathrm{mean}(w_0^2)} \quad\text{(once, at init)}\\
    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2, \qquad
    \hat v = v / (1 - \beta_2^t)\\
    g_n &= \mathrm{clip}(g / \sqrt{\hat v}, -g_{bound}, g_{bound})
      \quad (0/0 := 0)\\
    w &\leftarrow \mathrm{clip}(w\, e^{-\eta\, g_n \mathrm{sign}(w)},
      -w_{max}, w_{max})

  It is ``optax.chain(scale_by_second_moment(b2), optax.clip(g_bound),
  multiplicative_step(learning_rate), clip_weight_magnitude(p_scale))``,
  computed in one pass per tensor from the parts' own per-tensor functions,
  with the chain's state and, compiled, its numbers bit for bit (with
  ``factored=True``, :func:`madam_optax.scale_by_factored_second_moment`
  takes the first part's place, and the parts run as that chain). The default
  learning rate, 0.01, is the paper's. In our learning-rate study (four small
  models, 200 to 8000 steps with step decay), from 800 steps on, 0.1 was
  within noise of the best rate on every model, the default 0.01 only on the
  MLP: for runs of up to about 10,000 steps, with a decaying schedule, start
  at 0.1 and try 0.01 next. Weights never change sign and zero
  weights never move: route zero-initialised leaves (e.g. Flax's default
  biases) to an additive optimizer with
  :func:`madam_optax.with_additive_fallback`.

  Bad steps: a NaN or infinite gradient makes its weight NaN (visible in the
  loss) and leaves its second-moment entry unchanged. To skip such steps
  instead, wrap the optimizer: ``madam_optax.apply_if_finite(madam(), 5)``
  (``optax.apply_if_finite`` works too for float parameters).

  Hyperparameters: every argument works with ``optax.inject_hyperparams``.
  Optax casts injected values to the parameters' dtype, so for ``bfloat16``
  or ``float16`` parameters pass ``hyperparam_dtype=jnp.float32`` (without it
  the transforms refuse the rounded values with a ``ValueError``: ``b2 =
  0.999`` is 1.0 in ``bfloat16``). ``p_scale`` only acts at ``init`` (it fixes
  the bound from the initial weights): changing it afterwards has no effect
  until the state is re-initialised; an injected ``max_magnitude`` change
  takes effect at the next step. Limits of low precision and tiny weights
  are listed in :func:`madam_optax.multiplicative_step`.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule (a relative
      step: ``exp(-0.01 g_n)`` moves a weight by about ``g_n`` percent).
      Default 0.01, the paper's; for runs of up to about 10,000 steps start
      at 0.1 with a decaying schedule (see above).
    p_scale: per-tensor weight bound as a multiple of the initial RMS.
    g_bound: bound on the normalised gradient.
    b2: decay of the second-moment moving average, in ``[0, 1)``.
    state_dtype: dtype of the second-moment buffer (``None``: the parameter's
      dtype; ``jnp.bfloat16`` halves the state).
    max_magnitude: a fixed weight bound for every tensor instead of
      ``p_scale`` times the initial RMS.
    factored: use :func:`madam_optax.scale_by_factored_second_moment`
      (Adafactor's row and column statistics for matrices whose two largest
      dimensions have at least ``min_dim_size_to_factor`` entries) instead of
      the full second moment.
    min_dim_size_to_factor: see ``factored``; ignored without it.
    b1: decay of an optional first moment, in ``[0, 1)`` (beyond the paper).
      With ``b1 > 0`` the normalised gradient :math:`g / \sqrt{\hat v}` is
      replaced by Adam's bias-corrected direction :math:`\hat m / \sqrt{\hat
      v}`, :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g`, :math:`\hat m
      = m / (1 - \beta_1^t)` (:func:`madam_optax.scale_by_moments` in the
      first part's place), then the same clip, step and bound; the first
      step is still exactly a sign step. ``None`` (the default) or the
      Python number ``0.0`` is the paper's Madam: the same state, program
      and numbers as without the argument (``None``, not ``0.0``, is the
      default so that ``optax.inject_hyperparams``, which injects numeric
      defaults as arrays, leaves the state as it was). Given as an array
      (``optax.inject_hyperparams(madam)(b1=0.9)`` makes one), the
      first-moment buffer is always kept, even at 0. Costs
      one more buffer of the parameters' size (4 bytes per float32
      parameter, 2 with ``mu_dtype=jnp.bfloat16``). Not with ``factored``
      (a ``ValueError``).
    mu_dtype: dtype of the first-moment buffer (``None``: ``state_dtype``);
      only with ``b1``.
    warn_zero_leaves: at ``init``, when run eagerly (not under ``jax.jit`` or
      ``jax.eval_shape``), warn once (a ``UserWarning``) naming the
      parameter leaves that are all zero (they would never train) and the
      fix, :func:`madam_optax.with_additive_fallback`. ``False`` silences
      it; so does ``warnings.filterwarnings('ignore', message='.*all-zero
      parameter leaves at init')``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, madam_optax
    >>> params = {'w': jnp.array([1.0, -2.0, 3.0])}
    >>> loss = lambda p: jnp.sum((p['w'] - 0.5) ** 2)
    >>> tx = madam_optax.madam()
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(params['w'].round(3))   # each step moves log|w| by 0.01
    [ 0.971 -1.941  2.912]

    With a first moment (``b1=0.9``), a gradient that flips sign moves the
    weight back by a twentieth of a step, not a whole one:

    >>> tx = madam_optax.madam(b1=0.9)
    >>> w = {'w': jnp.array([1.0, 1.0])}
    >>> state = tx.init(w)
    >>> for g in ([1.0, 1.0], [-1.0, 1.0]):
    ...   updates, state = tx.update({'w': jnp.array(g)}, state, w)
    ...   w = optax.apply_updates(w, updates)
    >>> print(w['w'].round(4))     # without b1: [1.     0.9802]
    [0.9906 0.9802]

    The step count: the state is the chain's (one count for the moments'
    bias correction, one for the learning-rate schedule, always equal), so
    ``optax.tree.get(state, 'count')`` finds two and raises ``KeyError``.
    The schedule's count, the one call for ``madam``, ``lns_madam`` and
    their partitions (:func:`madam_optax.with_additive_fallback`):

    >>> optax.tree.get(
    ...   state, 'count',
    ...   filtering=lambda path, _: path[-1].tuple_name.endswith('StepState'))
    Array(2, dtype=int32)

  References:
    Bernstein, Zhao, Meister, Liu, Anandkumar, Yue, "Learning compositional
    functions via multiplicative weight updates", NeurIPS 2020,
    arXiv:2006.14560.
  """
  validation.check_hyperparameter(
    "g_bound", g_bound, low=0.0, low_inclusive=False
  )
  if not factored:
    return fused_madam.fused_madam(
      learning_rate,
      p_scale=p_scale,
      g_bound=g_bound,
      b2=b2,
      b1=b1,
      state_dtype=state_dtype,
      mu_dtype=mu_dtype,
      max_magnitude=max_magnitude,
      warn_zero_leaves=warn_zero_leaves,
    )
  return optax.chain(
    _normaliser(
      b2,
      state_dtype,
      factored,
      min_dim_size_to_factor,
      b1=b1,
      mu_dtype=mu_dtype,
    ),
    optax.clip(g_bound),
    multiplicative_step(learning_rate),
    clip_weight_magnitude(
      p_scale, max_magnitude=max_magnitude, warn_zero_leaves=warn_zero_leaves
    ),
  )


def _normaliser(
  b2, state_dtype, factored, min_dim_size_to_factor, *, b1=None, mu_dtype=None
) -> optax.GradientTransformationExtraArgs:
  """Steps 2-4: the full or the factored second moment, or the first moment
  over the full second moment's root."""
  if factored:
    if fused_madam.has_first_moment(b1) or mu_dtype is not None:
      raise ValueError(
        "factored=True keeps no first moment: b1 > 0 (or an array b1, or "
        "mu_dtype) with the factored second moment is not supported. Use "
        "factored=False with b1, or leave b1 out with factored."
      )
    return scale_by_factored_second_moment(
      b2, min_dim_size_to_factor=min_dim_size_to_factor, state_dtype=state_dtype
    )
  return fused_madam.normaliser(b1, b2, state_dtype, mu_dtype)


def _second_moment_for_codes(
  b2,
  state_dtype,
  factored=False,
  min_dim_size_to_factor=128,
  *,
  b1=None,
  mu_dtype=None,
) -> optax.GradientTransformationExtraArgs:
  """The normaliser (full or factored) whose ``init`` accepts integer codes."""
  inner = _normaliser(
    b2, state_dtype, factored, min_dim_size_to_factor, b1=b1, mu_dtype=mu_dtype
  )

  def init_fn(params):
    return inner.init(
      jax.tree.map(lambda c: jnp.zeros_like(c, dtype=jnp.float32), params)
    )

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)


def lns_madam(
  fmt: lns.LNSFormat,
  learning_rate: optax.ScalarOrSchedule = 0.01,
  *,
  g_bound: float = 10.0,
  b2: float = 0.999,
  rounding: str = "stochastic",
  seed: int = 0,
  state_dtype: Any = None,
  rng: str = "hash",
  factored: bool = False,
  min_dim_size_to_factor: int = 128,
  b1: float | None = None,
  mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Madam whose parameters are integer LNS codes (natively compressed).

  The weights are stored as codes :math:`c = s\,(levels - k)` meaning
  :math:`w = s\, w_{max}\, base^{-k}` (:class:`madam_optax.LNSFormat`); the
  gradients are taken with respect to the decoded weights. Each step is
  the paper's integer LNS rule (the README's LNS section):

  .. math::

    g_n &= \mathrm{clip}(g / \sqrt{\hat v}, -g_{bound}, g_{bound})
      \quad\text{(steps 2-5)}\\
    k &\leftarrow \mathrm{clip}\big(k + \mathrm{R}(\eta\, g_n
      \mathrm{sign}(w) / \log(base)),\ 0,\ levels - 1\big),

  with :math:`\mathrm{R}` stochastic (unbiased, default) or nearest rounding.
  It is ``optax.chain(scale_by_second_moment(b2), optax.clip(g_bound),
  lns_level_step(fmt, learning_rate))``. ``update(grads, state, codes)``
  returns integer code changes of the codes' dtype: ``optax.apply_updates``
  keeps the codes ``int8``/``int16``. Float leaves (Flax's zero-initialised
  biases) are refused: use :func:`madam_optax.with_additive_fallback` on the
  codes tree from :func:`madam_optax.lns_encode_tree`, which sends them to an
  additive optimizer. :func:`lns_value_and_grad` gives the gradients.

  Memory: 1 byte per weight (``int8`` codes) plus the second moment (2 bytes
  with ``state_dtype=jnp.bfloat16``), against Adam's 12 bytes in float32.
  With ``factored=True`` a large matrix keeps one statistic per row and per
  column instead (:func:`madam_optax.scale_by_factored_second_moment`):
  about 1 byte per weight in all.

  Bad steps: a NaN or infinite gradient entry (or a NaN learning rate) leaves
  its code and its second-moment entry unchanged; to skip the whole step and
  count such steps, wrap it in ``madam_optax.apply_if_finite(lns_madam(fmt),
  5)``. ``optax.apply_if_finite`` cannot wrap it (its skipped step returns
  float zeros where this returns integer code changes).

  Hyperparameters: under ``optax.inject_hyperparams`` pass
  ``hyperparam_dtype=jnp.float32``: Optax casts injected values to the
  parameters' dtype, which for ``int8`` codes turns a learning rate of 0.01
  into 0 (refused with a ``ValueError``).
  The updates are integer code changes: do not scale them afterwards
  (``optax.scale``, ``optax.contrib.reduce_on_plateau``, which also fails on
  integer parameters); scale the learning rate instead, e.g. by feeding
  ``reduce_on_plateau``'s ``scale`` into an injected ``learning_rate``.

  Args:
    fmt: the codes' :class:`madam_optax.LNSFormat`.
    learning_rate: :math:`\eta`, a float or an optax schedule; the same
      relative step and the same advice as :func:`madam`'s (default 0.01,
      the paper's; start at 0.1 with a decaying schedule for runs of up to
      about 10,000 steps).
    g_bound: bound on the normalised gradient.
    b2: decay of the second-moment moving average.
    rounding: ``"stochastic"`` (default) or ``"nearest"``.
    seed: seed of the PRNG key (in the state) for stochastic rounding.
    state_dtype: dtype of the second moment (default float32;
      ``jnp.bfloat16`` halves it).
    rng: random bits for stochastic rounding: ``"hash"`` (default; cheap,
      counter-based, the same however the codes are sharded) or
      ``"threefry"`` (``jax.random``); see :func:`lns_level_step`.
    factored: Adafactor's row and column statistics for large matrices
      instead of the full second moment (see :func:`madam`).
    min_dim_size_to_factor: see :func:`madam`; ignored without ``factored``.
    b1: decay of an optional first moment, as in :func:`madam`: with
      ``b1 > 0`` the level step is fed Adam's bias-corrected
      :math:`\hat m / \sqrt{\hat v}` (:func:`madam_optax.scale_by_moments`)
      instead of :math:`g / \sqrt{\hat v}`; ``None`` (default) or ``0.0`` (a
      Python number) is the paper's rule with today's state. The buffer costs 4 bytes per weight
      in float32, 2 with ``mu_dtype=jnp.bfloat16``. Not with ``factored``.
    mu_dtype: dtype of the first-moment buffer (``None``: ``state_dtype``,
      float32 by default); only with ``b1``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over the codes; ``update`` requires
    the codes as ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, madam_optax
    >>> fmt = madam_optax.LNSFormat.spanning(127)          # int8 codes
    >>> params = {'w': jnp.array([[0.5, -1.0], [0.25, 2.0]]), 'b': jnp.zeros(2)}
    >>> codes, w_max = madam_optax.lns_encode_tree(params, fmt)
    >>> tx = madam_optax.with_additive_fallback(
    ...     codes, madam_optax.lns_madam(fmt), optax.adam(1e-2))
    >>> state = tx.init(codes)
    >>> loss = lambda p: jnp.sum((jnp.ones(2) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> value_and_grad = madam_optax.lns_value_and_grad(loss, w_max, fmt)
    >>> for _ in range(50):
    ...   value, grads = value_and_grad(codes)
    ...   updates, state = tx.update(grads, state, codes)
    ...   codes = optax.apply_updates(codes, updates)
    >>> codes['w'].dtype, bool(value < loss(params))
    (dtype('int8'), True)

  References:
    Bernstein, Zhao, Meister, Liu, Anandkumar, Yue, "Learning compositional
    functions via multiplicative weight updates", NeurIPS 2020,
    arXiv:2006.14560.
  """
  validation.check_hyperparameter(
    "g_bound", g_bound, low=0.0, low_inclusive=False
  )
  return optax.chain(
    _second_moment_for_codes(
      b2,
      state_dtype,
      factored,
      min_dim_size_to_factor,
      b1=b1,
      mu_dtype=mu_dtype,
    ),
    optax.clip(g_bound),
    lns_level_step_lib.lns_level_step(
      fmt, learning_rate, rounding=rounding, seed=seed, rng=rng
    ),
  )


def lns_madam_reference() -> optax.GradientTransformationExtraArgs:
  r"""The paper's integer LNS variant: base :math:`e^{0.001}`, 4096 levels, step
  :math:`\mathrm{round}(10\, g_n)`, deterministic rounding.

  ``lns_madam(REFERENCE_FORMAT, learning_rate=0.01, rounding="nearest")``:
  :math:`\eta / \log(base) = 0.01 / 0.001 = 10` levels per unit of
  normalised gradient. Encode the weights with
  ``madam_optax.REFERENCE_FORMAT`` (``int16`` codes).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over ``int16`` codes.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> tx = madam_optax.lns_madam_reference()
    >>> codes = {'w': jnp.array([2000, -2000], jnp.int16)}
    >>> u, _ = tx.update({'w': jnp.array([0.3, 0.3])}, tx.init(codes), codes)
    >>> u['w']                           # g_n = sign(g) at step 1: 10 levels
    Array([-10, -10], dtype=int16)

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  return lns_madam(lns.REFERENCE_FORMAT, learning_rate=0.01, rounding="nearest")
