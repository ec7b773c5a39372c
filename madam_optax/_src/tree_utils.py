"""Pytree helpers shared by the transforms (no checks, no maths)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import optax


def leaves_with_path(tree: Any) -> list[tuple[Any, Any]]:
  """``(path, leaf)`` pairs of ``tree``, in ``jax.tree.leaves`` order."""
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def leaf_name(path: Any) -> str:
  """A readable name for a leaf path (``'<root>'`` for a bare array)."""
  return jax.tree_util.keystr(path) or "<root>"


def is_masked(x: Any) -> bool:
  """Whether ``x`` is an ``optax.MaskedNode`` (a leaf another transform owns)."""
  return isinstance(x, optax.MaskedNode)


def tree_map_unzip(
  fn: Callable[..., Sequence[Any]], tree: Any, *rest: Any, n_out: int = 2
) -> tuple[Any, ...]:
  """Maps ``fn`` (returning an ``n_out``-tuple) over leaves; returns n_out trees.

  ``None`` and ``optax.MaskedNode`` carry no leaves and pass through untouched.
  """
  leaves, treedef = jax.tree.flatten(tree)
  rest_leaves = [treedef.flatten_up_to(r) for r in rest]  # type: ignore[attr-defined]
  outs = [fn(*args) for args in zip(leaves, *rest_leaves)]
  cols = list(zip(*outs)) if outs else [[] for _ in range(n_out)]  # type: ignore[misc]
  return tuple(treedef.unflatten(list(col)) for col in cols)  # type: ignore[attr-defined]


def per_tensor_tuple(tree: Any) -> tuple[Any, ...]:
  """The leaves of ``tree`` (``MaskedNode`` included) as a flat tuple.

  States keep per-tensor scalars in this form rather than in a tree shaped
  like ``params``, so that wrappers which attach per-tensor metadata to the
  parameter tree (Flax NNX's sharding annotations on ``nnx.Param``) do not
  give a scalar its tensor's sharding.
  """
  return tuple(jax.tree.leaves(tree, is_leaf=is_masked))


def map_per_tensor(
  fn: Callable[..., Any],
  updates: Any,
  params: Any,
  scalars: Sequence[Any],
  *per_tensor: Sequence[Any],
  transform: str,
  what: str,
) -> Any:
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
      "`tx.init(params)` on the same parameter tree."
    )
  rows = zip(
    treedef.flatten_up_to(updates),  # type: ignore[attr-defined]
    params_leaves,
    scalars,
    *per_tensor,
  )
  new_updates = [u if is_masked(u) else fn(u, w, *rest) for u, w, *rest in rows]
  return treedef.unflatten(new_updates)  # type: ignore[attr-defined]
