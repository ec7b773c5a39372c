"""Argument and input checks: clear ``ValueError``s instead of silent NaN."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from madam_optax._src import tree_utils


def concrete_value(x: Any) -> float | None:
  """Returns ``x`` as a Python float when it is known at trace time, else None.

  Hyperparameters may arrive as tracers (under ``optax.inject_hyperparams`` or
  ``jax.jit``); those cannot be checked in Python and are left alone. Arrays
  of any numeric dtype (``bfloat16`` and ``float16`` included) are read.
  """
  if callable(x) or isinstance(x, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(x)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.size != 1 or not (
    jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == np.bool_
  ):
    return None
  return float(arr.reshape(()).astype(np.float64))


# What the docstrings and errors recommend for hyperparameters under
# ``optax.inject_hyperparams`` when the params are not float32/float64.
INJECT_HINT = (
  "optax.inject_hyperparams casts float hyperparameters to the params' "
  "dtype: pass `hyperparam_dtype=jnp.float32` (e.g. "
  "`optax.inject_hyperparams(madam_optax.lns_madam, "
  "hyperparam_dtype=jnp.float32)(fmt, learning_rate=0.01)`), or give it as "
  "a Python number or a float32 array."
)


def check_hyperparameter_dtype(name: str, value: Any) -> None:
  """Raises ``ValueError`` for a hyperparameter array that lost its precision.

  A hyperparameter keeps its own precision whatever the params' dtype: the
  transforms compute with it in float32 (float64 for float64 params). An
  array narrower than float32 (``bfloat16`` rounds ``b2 = 0.999`` to 1.0) or
  a strongly typed integer JAX array (``int8`` turns a learning rate of 0.01
  into 0) is what ``optax.inject_hyperparams`` makes of a float when the
  params are such arrays; the value it stood for is lost, so it is refused.
  Python numbers, NumPy integers and weakly typed integer arrays (from
  Python ints) are accepted. Works on tracers too (dtypes are static).
  """
  if value is None or callable(value) or isinstance(value, (bool, int, float)):
    return
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    return
  dtype = np.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    lost = f"a {dtype} array, which is coarser than float32"
  elif (
    jnp.issubdtype(dtype, jnp.integer)
    and isinstance(value, jax.Array)
    and not getattr(value, "weak_type", False)
  ):
    lost = (
      f"an {dtype} array (a float cast to integer params' dtype loses "
      "its fraction)"
    )
  else:
    return
  raise ValueError(f"{name} arrived as {lost}. {INJECT_HINT}")


def check_hyperparameter(
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_inclusive: bool = True,
  high_inclusive: bool = True,
  allow_none: bool = False,
) -> None:
  """Raises ``ValueError`` for an out-of-range or imprecise hyperparameter.

  The range is checked when the value is concrete (a tracer cannot be read);
  the dtype always (:func:`check_hyperparameter_dtype`).
  """
  if value is None:
    if allow_none:
      return
    raise ValueError(f"{name} must be a number, got None.")
  check_hyperparameter_dtype(name, value)
  v = concrete_value(value)
  if v is None:
    return
  if not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {v}.")
  if low is not None and (v < low or (v == low and not low_inclusive)):
    op = ">=" if low_inclusive else ">"
    raise ValueError(f"{name} must be {op} {low}, got {v}.")
  if high is not None and (v > high or (v == high and not high_inclusive)):
    op = "<=" if high_inclusive else "<"
    raise ValueError(f"{name} must be {op} {high}, got {v}.")


def check_decay_rate(
  name: str, value: Any, compute_dtype: Any = np.float32
) -> None:
  """Raises ``ValueError`` unless ``value`` is in ``[0, 1)`` in ``compute_dtype``.

  A decay rate such as ``b2 = 1 - 1e-8`` is below 1 as a Python float but
  rounds to 1.0 in float32, where the moving average never changes and every
  update is 0.
  """
  check_hyperparameter(name, value, low=0.0, high=1.0, high_inclusive=False)
  v = concrete_value(value)
  dtype = np.dtype(compute_dtype)
  if v is not None and np.asarray(v, dtype) >= 1.0:
    largest = np.nextafter(np.asarray(1.0, dtype), np.asarray(0.0, dtype))
    raise ValueError(
      f"{name}={v!r} rounds to 1.0 in {dtype}, the dtype it is computed in: "
      "the moving average would never change and every update would be 0. "
      f"Use {name} <= {float(largest)!r}."
    )


def leaf_dtype(leaf: Any) -> np.dtype:
  """The dtype of an array leaf, or the dtype JAX gives a Python scalar.

  ``2.0`` is float32 (float64 with ``jax_enable_x64``), as ``jnp.asarray``
  makes it.
  """
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None:
    return np.dtype(dtype)
  return np.dtype(jnp.asarray(leaf).dtype)


def as_arrays(tree: Any) -> Any:
  """``tree`` with Python-scalar leaves made JAX arrays (arrays unchanged).

  Lets a transform accept ``{'w': 2.0}`` as well as ``{'w': jnp.array(2.0)}``.
  """

  def leaf(x):
    return x if isinstance(x, (jax.Array, np.ndarray)) else jnp.asarray(x)

  return jax.tree.map(leaf, tree)


def check_finite_if_concrete(x: Any, what: str) -> None:
  """Raises ``ValueError`` when a concrete float array holds NaN or infinity.

  The test runs where the array lives; only its outcome (and, on failure, the
  count and first index) comes to the host. Tracers (inside ``jax.jit``)
  cannot be read and are left alone.
  """
  if isinstance(x, jax.core.Tracer):
    return
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
    return
  bad = jnp.logical_not(jnp.isfinite(x))
  if not bool(jnp.any(bad)):
    return
  first = tuple(
    int(i) for i in np.unravel_index(int(jnp.argmax(bad.ravel())), x.shape)
  )
  raise ValueError(
    f"{what} has {int(jnp.sum(bad))} non-finite value(s) (NaN or inf), "
    f"the first at index {first}: {float(x[first])}."
  )


def check_float_leaves(tree: Any, transform: str, what: str = "params") -> None:
  """Raises ``ValueError`` naming the first leaf that is not floating point."""
  for path, leaf in tree_utils.leaves_with_path(tree):
    dtype = leaf_dtype(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f"{transform}: {what} leaf {tree_utils.leaf_name(path)} "
        f"has dtype {dtype}; it needs a floating-point dtype. Cast it "
        "(e.g. `x.astype(jnp.float32)`), exclude it with `optax.masked`, or, "
        "for integer LNS codes, use `madam_optax.lns_madam`."
      )


def check_state_dtype_range(
  params: Any,
  state_dtype: np.dtype | None,
  transform: str,
  *,
  what: str = "second moment",
  argument: str = "state_dtype",
) -> None:
  """Raises ``ValueError`` when ``state_dtype`` has a narrower range than a
  leaf's dtype.

  ``what`` names the statistic and ``argument`` the keyword that set the
  dtype, for the message (``mu_dtype`` for the first moment).

  A second-moment statistic has the magnitude of the gradients: stored in a
  dtype whose largest value is smaller (float16 for float32 leaves, float32
  or bfloat16 for float64 ones) it would become ``inf`` or 0 for gradients
  the leaf's dtype holds, and those entries would silently stop moving.
  """
  if state_dtype is None:
    return
  state = jnp.finfo(state_dtype)
  for path, leaf in tree_utils.leaves_with_path(params):
    dtype = leaf_dtype(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      continue
    # The exponent range (bfloat16's is float32's, though its largest value
    # is a little smaller, as it has fewer mantissa bits).
    leaf_info = jnp.finfo(dtype)
    if state.maxexp < leaf_info.maxexp or state.minexp > leaf_info.minexp:
      raise ValueError(
        f"{transform}: {argument} {np.dtype(state_dtype).name} cannot hold "
        f"the {what} of {dtype} leaf {tree_utils.leaf_name(path)}: "
        "its range is narrower, so gradients beyond it would give zero "
        f"updates. Use a {argument} with the leaf's range (bfloat16 has "
        "float32's; None uses the leaf's own dtype)."
      )


def require_params(params: Any, transform: str) -> None:
  """Raises ``ValueError`` when a transform that needs ``params`` gets None."""
  if params is None:
    raise ValueError(
      f"{transform} needs the current parameters: call "
      "`tx.update(updates, state, params)` with `params` (with "
      "`nnx.Optimizer` this is done for you)."
    )


def check_same_structure(
  updates: Any, params: Any, transform: str, other: str = "params"
) -> None:
  """Raises ``ValueError`` when ``updates`` and ``params`` (or state) differ."""
  ts_u = jax.tree.structure(updates)
  ts_p = jax.tree.structure(params)
  if ts_u != ts_p:  # type: ignore[operator]
    raise ValueError(
      f"{transform}: the updates and {other} trees do not match.\n"
      f"  updates: {ts_u}\n  {other}: {ts_p}\n"
      "Pass gradients with exactly the structure of the parameters the "
      "optimizer was initialised with."
    )
  for (path, u), p in zip(
    tree_utils.leaves_with_path(updates), jax.tree.leaves(params)
  ):
    if jnp.shape(u) != jnp.shape(p):
      raise ValueError(
        f"{transform}: leaf {tree_utils.leaf_name(path)} has update shape "
        f"{jnp.shape(u)} but {other} shape {jnp.shape(p)}."
      )


def check_state_dtype(state_dtype: Any) -> np.dtype | None:
  """Returns ``state_dtype`` as a NumPy dtype; ``ValueError`` unless float."""
  if state_dtype is None:
    return None
  if isinstance(state_dtype, (jax.Array, np.ndarray, np.generic)):
    # optax.inject_hyperparams calls a dtype such as jnp.bfloat16 (it is
    # callable) like a schedule and passes on the array it returns.
    state_dtype = state_dtype.dtype
  state_dtype = jnp.dtype(state_dtype)
  if not jnp.issubdtype(state_dtype, jnp.floating):
    raise ValueError(
      f"state_dtype must be a floating-point dtype, got {state_dtype}."
    )
  return state_dtype
