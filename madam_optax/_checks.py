"""Input checks shared by the transforms: clear errors instead of silent NaN."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
                         high: float | None = None, low_inclusive=True,
                         high_inclusive=True, allow_none=False) -> None:
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


def _leaves_with_path(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def check_float_leaves(tree: Any, transform: str, what: str = "params") -> None:
  """Raises ``ValueError`` naming the first leaf that is not floating point."""
  for path, leaf in _leaves_with_path(tree):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      dtype = np.asarray(leaf).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{transform}: {what} leaf {jax.tree_util.keystr(path) or '<root>'} "
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
  for (path, u), p in zip(_leaves_with_path(updates), jax.tree.leaves(params)):
    if jnp.shape(u) != jnp.shape(p):
      raise ValueError(
          f"{transform}: leaf {jax.tree_util.keystr(path)} has update shape "
          f"{jnp.shape(u)} but {other} shape {jnp.shape(p)}.")


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype the maths runs in: at least float32, higher if the input is."""
  return jnp.promote_types(dtype, jnp.float32)


def tree_map_unzip(fn, tree, *rest, n_out: int = 2):
  """Maps ``fn`` (returning an ``n_out``-tuple) over leaves; returns n_out trees.

  ``None`` and ``optax.MaskedNode`` carry no leaves and pass through untouched.
  """
  leaves, treedef = jax.tree.flatten(tree)
  rest_leaves = [treedef.flatten_up_to(r) for r in rest]
  outs = [fn(*args) for args in zip(leaves, *rest_leaves)]
  cols = list(zip(*outs)) if outs else [[] for _ in range(n_out)]
  return tuple(treedef.unflatten(list(col)) for col in cols)


def is_masked(x: Any) -> bool:
  """Whether ``x`` is an ``optax.MaskedNode`` (a leaf another transform owns)."""
  return isinstance(x, optax.MaskedNode)


def map_per_tensor(fn, updates: Any, params: Any, scalars: Any, *per_tensor,
                   transform: str, what: str) -> Any:
  """``fn(u, w, scalar, *extras)`` for each tensor of ``params``.

  ``scalars`` is a state's flat tuple of per-tensor values, in
  ``jax.tree.leaves(params)`` order (``optax.MaskedNode`` leaves included);
  ``per_tensor`` are further sequences in that order. ``MaskedNode`` updates
  pass through unchanged. A state built for another tree is a ``ValueError``
  naming ``transform`` and ``what`` the state holds.
  """
  params_leaves, treedef = jax.tree.flatten(params, is_leaf=is_masked)
  scalars = tuple(scalars)
  if len(scalars) != len(params_leaves):
    raise ValueError(
        f"{transform}: the state holds {len(scalars)} {what} but params "
        f"have {len(params_leaves)} tensors. Initialise the state with "
        "`tx.init(params)` on the same parameter tree.")
  rows = zip(treedef.flatten_up_to(updates), params_leaves, scalars,
             *per_tensor)
  new_updates = [u if is_masked(u) else fn(u, w, *rest)
                 for u, w, *rest in rows]
  return treedef.unflatten(new_updates)
