"""LNS codes for whole parameter trees: encode, decode, and gradients."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from madam_optax._src import lns
from madam_optax._src import partition
from madam_optax._src import tree_utils
from madam_optax._src import validation


def _is_none(x: Any) -> bool:
  return x is None


def lns_encode_tree(
  params: Any, fmt: lns.LNSFormat, *, p_scale: float = 3.0, min_ndim: int = 0
) -> tuple[Any, Any]:
  """Encodes every multiplicatively trained leaf of a tree as LNS codes.

  Leaves that :func:`madam_optax.multiplicative_labels` labels
  ``"multiplicative"`` become integer codes with
  :math:`w_{max}` = :func:`madam_optax.initial_max_magnitude` ``(w0, p_scale)``;
  the others (all-zero leaves such as Flax's default biases, and leaves with
  fewer than ``min_ndim`` dimensions) stay in float, to be trained additively
  (:func:`madam_optax.with_additive_fallback`).

  Args:
    params: a pytree of finite floating-point arrays (concrete; e.g. a Flax
      NNX ``nnx.State``); a NaN or infinite entry is a ``ValueError`` naming
      its leaf.
    fmt: the :class:`madam_optax.LNSFormat`.
    p_scale: multiple of each tensor's RMS used as its :math:`w_{max}`.
    min_ndim: see :func:`madam_optax.multiplicative_labels`.

  Returns:
    ``(codes, max_magnitudes)``: ``codes`` has the structure of ``params``
    with integer leaves where encoded and the original float leaves
    elsewhere; ``max_magnitudes`` has a scalar where encoded and ``None``
    elsewhere.

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> fmt = madam_optax.LNSFormat.spanning(127)
    >>> params = {'w': jnp.array([[0.5, -1.0]]), 'b': jnp.zeros(2)}
    >>> codes, w_max = madam_optax.lns_encode_tree(params, fmt)
    >>> codes['w'].dtype, codes['b'].dtype, w_max['b']
    (dtype('int8'), dtype('float32'), None)
    >>> w = madam_optax.lns_decode_tree(codes, w_max, fmt)['w']
    >>> [round(float(x), 3) for x in w[0]]     # within half a level
    [0.501, -1.006]
  """
  lns.check_format(fmt)
  validation.check_float_leaves(params, "lns_encode_tree")
  for path, p in tree_utils.leaves_with_path(params):
    validation.check_finite_if_concrete(
      p, f"lns_encode_tree: leaf {tree_utils.leaf_name(path)}"
    )

  def leaf(p):
    if partition.multiplicative_labels(p, min_ndim=min_ndim) != (
      partition.MULTIPLICATIVE
    ):
      return p, None
    return lns.lns_encode(p, fmt, p_scale=p_scale)

  return tree_utils.tree_map_unzip(leaf, params)


def lns_decode_tree(
  codes: Any, max_magnitudes: Any, fmt: lns.LNSFormat, dtype: Any = None
) -> Any:
  """Decodes the integer leaves of a tree from :func:`lns_encode_tree`.

  Leaves whose ``max_magnitude`` is ``None`` pass through unchanged. By
  default each leaf decodes to the dtype of its ``max_magnitude``, which
  :func:`lns_encode_tree` gives in the weights' compute dtype: float32 for
  float32 (and narrower) weights, float64 for float64 weights, so a float64
  tree round-trips in float64 (its tiny magnitudes, e.g. ``1e-303``,
  included).

  Args:
    codes: the codes tree.
    max_magnitudes: the per-tensor :math:`w_{max}` tree (``None`` where a
      leaf is not encoded).
    fmt: the :class:`madam_optax.LNSFormat`.
    dtype: floating-point dtype of the decoded weights (e.g.
      ``jnp.bfloat16`` for a bfloat16 forward pass); ``None``: each leaf's
      ``max_magnitude`` dtype.

  Returns:
    A tree of floating-point arrays with the structure of ``codes``.

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=4, base=2.0)
    >>> madam_optax.lns_decode_tree(
    ...     {'w': jnp.array([4, -1], jnp.int8), 'b': jnp.ones(1)},
    ...     {'w': jnp.float32(1.0), 'b': None}, fmt)
    {'b': Array([1.], dtype=float32), 'w': Array([ 1.   , -0.125], dtype=float32)}
  """

  def leaf(max_magnitude, c):
    if max_magnitude is None:
      return c
    if dtype is not None:
      to = dtype
    else:  # a Python number (no dtype) decodes to float32, as before
      to = getattr(max_magnitude, "dtype", jnp.float32)
    return lns.lns_decode(c, max_magnitude, fmt, to)

  return jax.tree.map(leaf, max_magnitudes, codes, is_leaf=_is_none)


def lns_value_and_grad(
  fun: Callable[..., Any],
  max_magnitudes: Any,
  fmt: lns.LNSFormat,
  *,
  has_aux: bool = False,
  compute_dtype: Any = None,
) -> Callable[..., Any]:
  """``jax.value_and_grad`` of ``fun`` at the decoded weights of LNS codes.

  ``fun(params, *args)`` is written for float weights. The returned function
  takes the codes tree (from :func:`madam_optax.lns_encode_tree`), decodes it
  (:func:`madam_optax.lns_decode_tree`), and returns ``fun``'s value and its
  gradient with respect to the decoded weights: a float tree with the
  structure of the codes, ready for ``lns_madam``'s ``update``.

  With ``compute_dtype=jnp.bfloat16`` the codes decode to bfloat16 and their
  gradients are bfloat16: half the bytes of float32 for the decoded weights
  and the gradient tree that a training step holds. Each decoded weight is
  its float32 decoding rounded once to bfloat16 (a relative change of at
  most :math:`2^{-9}`, a small fraction of the spacing of an int8 grid:
  3.2 % for ``LNSFormat.spanning(127)``). ``lns_madam`` takes bfloat16
  gradients as they are. Leaves that are not encoded keep their dtype.

  Args:
    fun: the loss, differentiable in its first argument.
    max_magnitudes: the :math:`w_{max}` tree from
      :func:`madam_optax.lns_encode_tree`.
    fmt: the :class:`madam_optax.LNSFormat`.
    has_aux: as in ``jax.value_and_grad``.
    compute_dtype: dtype of the decoded weights and of their gradients;
      ``None``: each leaf's ``max_magnitude`` dtype (float32, or float64 for
      weights encoded from float64).

  Returns:
    ``f(codes, *args) -> (value, grads)`` (``((value, aux), grads)`` with
    ``has_aux``).

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=4, base=2.0)
    >>> f = madam_optax.lns_value_and_grad(
    ...     lambda p, x: jnp.sum(p['w'] * x), {'w': jnp.float32(1.0)}, fmt)
    >>> f({'w': jnp.array([4, -2], jnp.int8)}, jnp.array([1.0, 2.0]))
    (Array(0.5, dtype=float32), {'w': Array([1., 2.], dtype=float32)})
  """
  lns.check_format(fmt)

  def wrapped(codes, *args, **kwargs):
    weights = lns_decode_tree(codes, max_magnitudes, fmt, compute_dtype)
    return jax.value_and_grad(
      lambda w: fun(w, *args, **kwargs), has_aux=has_aux
    )(weights)

  return wrapped
