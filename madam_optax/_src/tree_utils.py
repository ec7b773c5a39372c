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


def is_variable(x: Any) -> bool:
  """Array wrappers such as Flax NNX ``Variable``s (duck-typed: no Flax import)."""
  return hasattr(x, "get_value") and hasattr(x, "set_value")


def is_abstract(x: Any) -> bool:
  """Whether ``x`` has a shape and dtype but no value (``jax.ShapeDtypeStruct``)."""
  return isinstance(x, jax.ShapeDtypeStruct)


def per_tensor_tree(fn: Callable[[Any, Any], Any], params: Any) -> Any:
  """``fn(path, tensor)`` for each tensor of ``params``, as a params-shaped tree.

  The result has the structure of ``params`` with plain values where the
  tensors were: a Flax NNX ``Variable`` is unwrapped (``fn`` sees its value),
  so its metadata (a sharding per axis) is not copied onto a per-tensor
  scalar; ``optax.MaskedNode`` and ``None`` leaves are kept as they are.
  Being shaped like ``params``, such an entry is found by
  ``optax.tree.map_params``, and ``jax.tree.leaves`` of it follows
  ``jax.tree.leaves(params)``.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
    params, is_leaf=lambda x: is_masked(x) or is_variable(x)
  )
  return treedef.unflatten(  # type: ignore[attr-defined]
    [
      p if is_masked(p) else fn(path, p.get_value() if is_variable(p) else p)
      for path, p in leaves
    ]
  )


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

  The per-tensor entries of a state (:func:`per_tensor_tree`), in
  ``jax.tree.leaves(params)`` order. A flat tuple of such entries (the state
  format of madam-optax 0.2) gives the same tuple, so states saved in that
  format still update.
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
