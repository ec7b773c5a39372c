"""The step count of a state, read as frameworks read it: ``optax.tree.get``.

A Madam state holds several ``count`` fields (the moments' and the
schedule's; a partition adds the additive optimizer's), so a plain
``optax.tree.get(state, "count")`` raises ``KeyError``; the call documented
in :func:`madam_optax.madam` (a filter on the step part's state) returns the
number of updates for every Madam optimizer and partition.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
import pytest

import madam_optax


def _step_count(state):
  """The documented call (madam_optax.madam's docstring)."""
  return optax.tree.get(
    state,
    "count",
    filtering=lambda path, _: path[-1].tuple_name.endswith("StepState"),
  )


def _cases():
  w = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]])}
  with_zero = {**w, "b": jnp.zeros((2,))}
  codes, _ = madam_optax.lns_encode_tree(w, madam_optax.REFERENCE_FORMAT)
  return {
    "madam": (madam_optax.madam(), w),
    "madam_b1": (madam_optax.madam(b1=0.9), w),
    "madam_factored": (
      madam_optax.madam(factored=True, min_dim_size_to_factor=2),
      w,
    ),
    "madam_chain": (
      optax.chain(
        madam_optax.scale_by_second_moment(),
        optax.clip(10.0),
        madam_optax.multiplicative_step(),
        madam_optax.clip_weight_magnitude(),
      ),
      w,
    ),
    "lns_madam": (madam_optax.lns_madam(madam_optax.REFERENCE_FORMAT), codes),
    "with_additive_fallback": (
      madam_optax.with_additive_fallback(
        with_zero, madam_optax.madam(), optax.adam(1e-3)
      ),
      with_zero,
    ),
  }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_documented_call_returns_the_step_count(name):
  tx, params = _cases()[name]
  state = tx.init(params)
  assert int(_step_count(state)) == 0
  for _ in range(3):
    grads = {k: jnp.ones(jnp.shape(v), jnp.float32) for k, v in params.items()}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert int(_step_count(state)) == 3
  # Without the filter: several counts, as the docstring says.
  with pytest.raises(KeyError):
    optax.tree.get(state, "count")
