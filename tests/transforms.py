"""The one registry of public transforms that the core tests draw from.

Each :class:`Case` says how to build one public factory (plainly and through
``optax.inject_hyperparams``, naming its injectable hyperparameters), what
parameters it takes (a float tree, or int8/int16 LNS codes from
``madam_optax.lns_encode_tree``), what its gradients look like (float, shaped
like the parameters; for codes, taken at the decoded weights), how a part is
completed into a whole optimizer, and which invariants hold.

To add a transform, append one ``Case`` to ``CASES``: the contract matrix
(``test_contract.py``), the property tests (``test_properties.py``), the
sharding tests (``test_sharding.py``) and the input checks
(``test_validation.py``) pick it up. A check a case is known to fail today is
listed in its ``known_failures`` (check name: reason) and runs as a strict
xfail, so that a fix shows up as an unexpected pass.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax

# ------------------------------------------------------------------ formats

INT8_FORMAT = madam_optax.LNSFormat.spanning(127)  # int8 codes
INT16_FORMAT = madam_optax.LNSFormat.spanning(4096)  # int16 codes
# log_quantise's grid for float params: fine enough (0.001 in log|w| between
# levels) that Madam's 0.01 step moves a weight even with nearest rounding.
FLOAT_GRID = madam_optax.LNSFormat.spanning(4096)

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
CODE_FORMATS = {"int8": INT8_FORMAT, "int16": INT16_FORMAT}

# --------------------------------------------------------------- invariants

SIGN_KEPT = "sign_kept"  # no weight (or code) ever changes sign
ZEROS_STAY = "zeros_stay"  # an exact zero never moves
NONZERO = "nonzero_stays"  # an ordinary non-zero weight never becomes 0
BOUNDED = "bounded"  # |w| <= p_scale * RMS(w0) per tensor
SIGN_STEP = "first_step_sign"  # the first update sees only sign(g)
ON_GRID = "on_grid"  # float weights lie on the LNS grid
IN_RANGE = "codes_in_range"  # codes keep their dtype, 1 <= |c| <= levels
FINITE = "finite"  # finite weights and gradients stay finite

MULTIPLICATIVE = frozenset({SIGN_KEPT, ZEROS_STAY})

# ------------------------------------------------------- checks known to fail

# The names of the contract checks that a case can list in known_failures.
EXTRA_ARGS = "extra_args"
MAP_PARAMS = "map_params"
MISMATCHED_TREES = "mismatched_trees"

PARTITION_FIRST = (
  "optax.partition maps over the updates with the labels' structure first: "
  "JAX's pytree error (naming the differing keys) comes before ours, which "
  "says how to fix the call"
)
REFERENCE_DEAD_ZONE = (
  "SPEC 2's deterministic rule at its fixed b2=0.999 and rate: a step below "
  "half a level (|g_n| < 0.05) rounds to zero, and in Rosenbrock's valley "
  "the normalised gradient falls below that before the optimum"
)


@dataclasses.dataclass(frozen=True, repr=False)
class Case:
  """One public transform as the tests build and use it.

  Attributes:
    name: the test id.
    factory: the public factory; the one ``inject_hyperparams`` wraps.
    hyperparams: the injectable numeric hyperparameters, with the values the
      tests use (all differ from the defaults).
    static: other keyword arguments, never injected (``rounding``, ``seed``,
      ``state_dtype``).
    fmt: the codes' (or grid's) ``LNSFormat``, passed first and positionally;
      ``None`` when the factory takes none.
    wrap: ``(tx, params) -> tx``, a public wrapper that is part of the case
      (``with_additive_fallback``).
    complete: ``(tx, learning_rate) -> tx``, what makes a part a whole
      optimizer (``learning_rate`` is None for the default); the part itself
      takes the rate when its factory has a ``learning_rate``.
    codes: whether the params are integer LNS codes.
    needs_params: whether ``update`` needs ``params``.
    converge: arguments the convergence checks pass on top of the factory's
      defaults.
    invariants: the properties that hold step after step (see the constants
      above).
    known_failures: contract check name -> reason, for checks this case is
      known to fail today (run as strict xfails).
    factored: the case keeps a factored second moment: the property tests
      lay their tensor out as a matrix (a vector is never factored), and
      its row and column statistics are sharded with their dimension, not
      like the parameter (``test_factored_second_moment.py`` tests that).
  """

  name: str
  factory: Callable[..., optax.GradientTransformation]
  hyperparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  static: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  fmt: madam_optax.LNSFormat | None = None
  wrap: Callable[[Any, Any], Any] | None = None
  complete: Callable[[Any, Any], Any] | None = None
  codes: bool = False
  needs_params: bool = True
  converge: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  invariants: frozenset = frozenset()
  known_failures: Mapping[str, str] = dataclasses.field(default_factory=dict)
  factored: bool = False

  def __str__(self) -> str:
    return self.name

  def __repr__(self) -> str:
    return f"Case({self.name!r})"

  # ------------------------------------------------------------- building

  @property
  def takes_learning_rate(self) -> bool:
    return "learning_rate" in parameters(self.factory)

  @property
  def p_scale(self) -> float:
    """The per-tensor bound's multiple of the initial RMS."""
    return float(self.hyperparams.get("p_scale", 3.0))

  def transform(
    self,
    params: Any = None,
    *,
    inject: bool = False,
    fmt: madam_optax.LNSFormat | None = None,
    defaults: bool = False,
    **overrides,
  ) -> optax.GradientTransformation:
    """The public object under test (the factory's output, wrapped if so).

    Args:
      params: the initial parameters (only ``wrap`` uses them).
      inject: build through ``optax.inject_hyperparams``.
      fmt: another format of the same kind, for cases that take one.
      defaults: leave the hyperparameters at the factory's defaults.
      **overrides: keyword arguments replacing the case's.
    """
    factory = self.factory
    if inject:
      static = tuple(self.static) + (("fmt",) if self.fmt is not None else ())
      factory = optax.inject_hyperparams(
        factory,
        static_args=static,
        # Integer codes would give the rates an integer dtype.
        hyperparam_dtype=jnp.float32 if self.codes else None,
      )
    args = () if self.fmt is None else (fmt or self.fmt,)
    hyperparams = {} if defaults else self.hyperparams
    tx = factory(*args, **{**self.static, **hyperparams, **overrides})
    return tx if self.wrap is None else self.wrap(tx, params)

  def optimizer(
    self,
    params: Any = None,
    *,
    learning_rate: Any = None,
    inject: bool = False,
    fmt: madam_optax.LNSFormat | None = None,
    defaults: bool = False,
    **overrides,
  ) -> optax.GradientTransformation:
    """The case as a whole optimizer, at ``learning_rate`` (float/schedule).

    Other arguments as in :meth:`transform`.
    """
    if learning_rate is not None and self.takes_learning_rate:
      overrides["learning_rate"] = learning_rate
    tx = self.transform(
      params, inject=inject, fmt=fmt, defaults=defaults, **overrides
    )
    if self.complete is None:
      return tx
    return self.complete(
      tx, None if self.takes_learning_rate else learning_rate
    )

  # ---------------------------------------------------- params and grads

  @property
  def dtypes(self) -> tuple[str, ...]:
    """The parameter dtypes the case takes (float, or its codes' dtypes)."""
    if not self.codes:
      return FLOAT_DTYPES
    if self.fmt is None:
      return (np.dtype(madam_optax.REFERENCE_FORMAT.dtype).name,)
    return tuple(CODE_FORMATS)

  def format_for(self, dtype: str) -> madam_optax.LNSFormat | None:
    """The format giving codes of ``dtype`` (None for float params)."""
    if not self.codes:
      return None
    if self.fmt is None:
      return madam_optax.REFERENCE_FORMAT
    return (
      self.fmt if self.fmt.dtype == np.dtype(dtype) else CODE_FORMATS[dtype]
    )

  @property
  def code_format(self) -> madam_optax.LNSFormat:
    """The format of this case's codes (or grid)."""
    return self.fmt or madam_optax.REFERENCE_FORMAT

  def encode(
    self, weights: Any, fmt: madam_optax.LNSFormat | None = None
  ) -> tuple[Any, Callable[[Any], Any]]:
    """``(params, decode)`` for float ``weights``: codes for code cases.

    ``decode(params)`` gives the float weights the loss sees (the identity
    for float cases).
    """
    if not self.codes:
      return weights, lambda p: p
    fmt = fmt or self.code_format
    codes, max_magnitudes = madam_optax.lns_encode_tree(weights, fmt)
    return codes, lambda c: madam_optax.lns_decode_tree(c, max_magnitudes, fmt)

  def example_params(self, dtype: str | None = None, seed: int = 0) -> Any:
    """A small tree (a kernel, a bias, a scalar), non-zero everywhere."""
    weights = example_weights(seed)
    if not self.codes:
      return jax.tree.map(lambda w: w.astype(dtype or "float32"), weights)
    fmt = self.format_for(dtype) if dtype else self.code_format
    return self.encode(weights, fmt)[0]

  def example_grads(self, params: Any, seed: int) -> Any:
    """Random gradients shaped like ``params`` (float32 for codes)."""
    rng = np.random.default_rng(1000 + seed)

    return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(jnp.shape(p)), _float_dtype(p)),
      params,
    )

  # -------------------------------------------------------------- xfails

  def param(self, check: str | None = None, *values):
    """``pytest.param`` of this case, a strict xfail if it fails ``check``."""
    marks = ()
    if check in self.known_failures:
      marks = pytest.mark.xfail(strict=True, reason=self.known_failures[check])
    return pytest.param(
      self, *values, id="-".join([self.name, *map(str, values)]), marks=marks
    )


def parameters(factory) -> Mapping[str, Any]:
  return inspect.signature(factory).parameters


def example_weights(seed: int = 0) -> dict[str, Any]:
  """Float32 weights: a (4, 3) kernel, a (3,) bias and a scalar, non-zero."""
  rng = np.random.default_rng(seed)

  def nonzero(shape):
    w = rng.standard_normal(shape)
    return jnp.asarray(np.where(np.abs(w) < 0.05, 0.5, w), jnp.float32)

  return {
    "dense": {"kernel": nonzero((4, 3)), "bias": nonzero((3,))},
    "scale": nonzero(()),
  }


# ------------------------------------------------------------- completions


def _rate(learning_rate):
  return 0.01 if learning_rate is None else learning_rate


def _then_learning_rate(tx, learning_rate):
  """``scale_by_second_moment``, then the rate: RMSProp without epsilon."""
  return optax.chain(tx, optax.scale_by_learning_rate(_rate(learning_rate)))


def _after_second_moment(tx, learning_rate):
  """A step that wants normalised gradients, after ``scale_by_second_moment``.

  For codes, the second moment is initialised from float zeros shaped like
  the codes (``scale_by_second_moment`` refuses integer params).
  """
  del learning_rate  # the step's own
  normalise = madam_optax.scale_by_second_moment()

  def init(params):  # zeros_like keeps the codes' shardings
    return normalise.init(
      jax.tree.map(lambda p: jnp.zeros_like(p, dtype=_float_dtype(p)), params)
    )

  return optax.chain(
    optax.GradientTransformationExtraArgs(init, normalise.update), tx
  )


def _after_adam(tx, learning_rate):
  """``clip_weight_magnitude`` bounds Adam's weights."""
  return optax.chain(optax.adam(_rate(learning_rate)), tx)


def _after_madam(tx, learning_rate):
  """``log_quantise`` projects Madam's weights onto the grid.

  ``b2=0.9`` keeps Madam's normalised gradient near +-1: nearest rounding
  drops a step below half a grid level, and with ``b2=0.999`` the normalised
  gradient shrinks near an optimum until every step is that small.
  """
  return optax.chain(
    madam_optax.madam(learning_rate=_rate(learning_rate), b2=0.9), tx
  )


def _with_additive_fallback(tx, params):
  """Scalars (tensors of fewer than 1 dimension) go to Adam."""
  return madam_optax.with_additive_fallback(
    params, tx, optax.adam(1e-2), min_ndim=1
  )


def _float_dtype(p):
  dtype = jnp.result_type(p)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


MADAM_HYPERPARAMS = {
  "learning_rate": 0.03,
  "p_scale": 2.0,
  "g_bound": 0.7,
  "b2": 0.9,
  "min_dim_size_to_factor": 64,
}
# min_dim_size_to_factor is numeric, so inject_hyperparams injects it too; it
# only acts with factored=True, which these cases leave off.
LNS_MADAM_HYPERPARAMS = {
  "learning_rate": 0.05,
  "g_bound": 5.0,
  "b2": 0.99,
  "min_dim_size_to_factor": 64,
}
MADAM_INVARIANTS = MULTIPLICATIVE | {NONZERO, BOUNDED, SIGN_STEP, FINITE}
# Nearest rounding drops steps below half a level: b2=0.9 keeps the
# normalised gradient near +-1 (see _after_madam).
NEAREST_CONVERGENCE = {"b2": 0.9}

CASES = (
  Case(
    "scale_by_second_moment",
    madam_optax.scale_by_second_moment,
    hyperparams={"b2": 0.9},
    complete=_then_learning_rate,
    needs_params=False,
    invariants=frozenset({SIGN_STEP, FINITE}),
  ),
  Case(
    "scale_by_moments",
    madam_optax.scale_by_moments,
    hyperparams={"b1": 0.8, "b2": 0.9},
    complete=_then_learning_rate,
    needs_params=False,
    # m_hat_1 = g_1 exactly: the first step is sign(g), as without b1.
    invariants=frozenset({SIGN_STEP, FINITE}),
  ),
  Case(
    "multiplicative_step",
    madam_optax.multiplicative_step,
    hyperparams={"learning_rate": 0.05},
    complete=_after_second_moment,
    invariants=MULTIPLICATIVE | {SIGN_STEP},
  ),
  Case(
    "clip_weight_magnitude",
    madam_optax.clip_weight_magnitude,
    hyperparams={"p_scale": 0.8},
    complete=_after_adam,
    invariants=frozenset({BOUNDED, FINITE}),
  ),
  Case(
    "log_quantise_nearest",
    madam_optax.log_quantise,
    hyperparams={"p_scale": 2.0},
    static={"rounding": "nearest", "seed": 0},
    fmt=FLOAT_GRID,
    complete=_after_madam,
    invariants=MADAM_INVARIANTS | {ON_GRID},
  ),
  Case(
    "log_quantise_stochastic",
    madam_optax.log_quantise,
    hyperparams={"p_scale": 2.0},
    static={"rounding": "stochastic", "seed": 1},
    fmt=FLOAT_GRID,
    complete=_after_madam,
    invariants=MADAM_INVARIANTS | {ON_GRID},
  ),
  Case(
    "madam",
    madam_optax.madam,
    hyperparams=MADAM_HYPERPARAMS,
    invariants=MADAM_INVARIANTS,
  ),
  Case(
    "madam_bf16_state",
    madam_optax.madam,
    hyperparams=MADAM_HYPERPARAMS,
    static={"state_dtype": jnp.bfloat16},
    invariants=MADAM_INVARIANTS,
  ),
  Case(
    "madam_b1",
    madam_optax.madam,
    hyperparams={**MADAM_HYPERPARAMS, "b1": 0.9},
    invariants=MADAM_INVARIANTS,
  ),
  Case(
    "madam_with_additive_fallback",
    madam_optax.madam,
    hyperparams=MADAM_HYPERPARAMS,
    wrap=_with_additive_fallback,
    invariants=MADAM_INVARIANTS,
    known_failures={MISMATCHED_TREES: PARTITION_FIRST},
  ),
  Case(
    "scale_by_factored_second_moment",
    madam_optax.scale_by_factored_second_moment,
    hyperparams={"b2": 0.9},
    # The example kernel (4, 3) and the property tests' (3, 4) are factored.
    static={"min_dim_size_to_factor": 2},
    complete=_then_learning_rate,
    needs_params=False,
    factored=True,
    # The first step is sign(g) only where |g| is rank one (documented).
    invariants=frozenset({FINITE}),
  ),
  Case(
    "madam_factored",
    madam_optax.madam,
    hyperparams={
      k: v
      for k, v in MADAM_HYPERPARAMS.items()
      if k != "min_dim_size_to_factor"
    },
    static={"factored": True, "min_dim_size_to_factor": 2},
    factored=True,
    # Neither: the first step is sign(g) only where |g| is rank one, and the
    # rank-one fit's |u| reaches g_bound from the first step (the full
    # normaliser's is at most sqrt((1 - b2**t) / (1 - b2))), so six steps at
    # rate 1 can shrink a weight by e**-60: a 1e-21 underflows.
    invariants=MADAM_INVARIANTS - {SIGN_STEP, NONZERO},
  ),
  Case(
    "lns_level_step",
    madam_optax.lns_level_step,
    hyperparams={"learning_rate": 0.05},
    static={"rounding": "stochastic", "seed": 0},
    fmt=INT8_FORMAT,
    complete=_after_second_moment,
    codes=True,
    invariants=MULTIPLICATIVE | {IN_RANGE, SIGN_STEP},
  ),
  Case(
    "lns_madam_nearest",
    madam_optax.lns_madam,
    hyperparams=LNS_MADAM_HYPERPARAMS,
    static={"rounding": "nearest", "seed": 0},
    fmt=INT16_FORMAT,
    codes=True,
    converge=NEAREST_CONVERGENCE,
    invariants=MULTIPLICATIVE | {IN_RANGE, SIGN_STEP},
  ),
  Case(
    "lns_madam_stochastic",
    madam_optax.lns_madam,
    hyperparams=LNS_MADAM_HYPERPARAMS,
    static={"rounding": "stochastic", "seed": 2},
    fmt=INT8_FORMAT,
    codes=True,
    invariants=MULTIPLICATIVE | {IN_RANGE, SIGN_STEP},
  ),
  Case(
    "lns_madam_b1",
    madam_optax.lns_madam,
    hyperparams={**LNS_MADAM_HYPERPARAMS, "b1": 0.9},
    static={"rounding": "stochastic", "seed": 3},
    fmt=INT8_FORMAT,
    codes=True,
    invariants=MULTIPLICATIVE | {IN_RANGE, SIGN_STEP},
  ),
  Case(
    "lns_madam_reference",
    madam_optax.lns_madam_reference,
    codes=True,
    invariants=MULTIPLICATIVE | {IN_RANGE, SIGN_STEP},
    known_failures={"converges_rosenbrock": REFERENCE_DEAD_ZONE},
  ),
)

BY_NAME = {case.name: case for case in CASES}


def cases(
  *invariants: str,
  check: str | None = None,
  codes: bool | None = None,
  where: Callable[[Case], bool] | None = None,
) -> list[Any]:
  """``pytest.param``s of the cases holding all ``invariants``.

  Args:
    *invariants: keep the cases that hold all of these.
    check: the contract check about to run; cases known to fail it become
      strict xfails.
    codes: keep only code cases (True) or only float cases (False).
    where: a further filter.
  """
  return [
    case.param(check)
    for case in CASES
    if set(invariants) <= case.invariants
    and (codes is None or case.codes == codes)
    and (where is None or where(case))
  ]


def cases_by_dtype(check: str | None = None) -> list[Any]:
  """``(case, dtype)`` params over every parameter dtype each case takes."""
  return [case.param(check, dtype) for case in CASES for dtype in case.dtypes]
