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
  ``jax.jit``); those cannot be checked in Python and are left alone.
  """
  if callable(x) or isinstance(x, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(x)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
    return None
  return float(arr.reshape(()))


def check_hyperparameter(name: str, value: Any, *, low: float | None = None,
                         high: float | None = None, low_inclusive: bool = True,
                         high_inclusive: bool = True,
                         allow_none: bool = False) -> None:
  """Raises ``ValueError`` when a concrete hyperparameter is out of range."""
  if value is None:
    if allow_none:
      return
    raise ValueError(f"{name} must be a number, got None.")
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


def leaf_dtype(leaf: Any) -> np.dtype:
  """The dtype of an array leaf, or of ``np.asarray(leaf)`` for scalars."""
  dtype = getattr(leaf, "dtype", None)
  return np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype


def check_float_leaves(tree: Any, transform: str, what: str = "params") -> None:
  """Raises ``ValueError`` naming the first leaf that is not floating point."""
  for path, leaf in tree_utils.leaves_with_path(tree):
    dtype = leaf_dtype(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{transform}: {what} leaf {tree_utils.leaf_name(path)} "
          f"has dtype {dtype}; it needs a floating-point dtype. Cast it "
          "(e.g. `x.astype(jnp.float32)`), exclude it with `optax.masked`, or, "
          "for integer LNS codes, use `madam_optax.lns_madam`.")


def require_params(params: Any, transform: str) -> None:
  """Raises ``ValueError`` when a transform that needs ``params`` gets None."""
  if params is None:
    raise ValueError(
        f"{transform} needs the current parameters: call "
        "`tx.update(updates, state, params)` with `params` (with "
        "`nnx.Optimizer` this is done for you).")


def check_same_structure(updates: Any, params: Any, transform: str,
                         other: str = "params") -> None:
  """Raises ``ValueError`` when ``updates`` and ``params`` (or state) differ."""
  ts_u = jax.tree.structure(updates)
  ts_p = jax.tree.structure(params)
  if ts_u != ts_p:
    raise ValueError(
        f"{transform}: the updates and {other} trees do not match.\n"
        f"  updates: {ts_u}\n  {other}: {ts_p}\n"
        "Pass gradients with exactly the structure of the parameters the "
        "optimizer was initialised with.")
  for (path, u), p in zip(tree_utils.leaves_with_path(updates),
                          jax.tree.leaves(params)):
    if jnp.shape(u) != jnp.shape(p):
      raise ValueError(
          f"{transform}: leaf {tree_utils.leaf_name(path)} has update shape "
          f"{jnp.shape(u)} but {other} shape {jnp.shape(p)}.")


def check_state_dtype(state_dtype: Any) -> np.dtype | None:
  """Returns ``state_dtype`` as a NumPy dtype; ``ValueError`` unless float."""
  if state_dtype is None:
    return None
  state_dtype = jnp.dtype(state_dtype)
  if not jnp.issubdtype(state_dtype, jnp.floating):
    raise ValueError(
        f"state_dtype must be a floating-point dtype, got {state_dtype}.")
  return state_dtype
