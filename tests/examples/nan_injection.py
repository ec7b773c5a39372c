"""Test aid: a NaN loss and NaN gradients at chosen steps of ``sharded_train``.

Inside :func:`nan_at`, the training batches of the chosen (1-based) steps
hold an impossible token (-1) in the rows this process builds, and the
next-character loss of a batch holding one is NaN (and so are its
gradients). Every process must enter it, so that all compile the same
program; ``poison_rows=False`` on the processes whose rows stay clean.
"""

import contextlib

import jax.numpy as jnp

from madam_examples import sharded_train
from madam_examples import tasks


@contextlib.contextmanager
def nan_at(steps, *, poison_rows=True, seed=0):
  """NaN at ``steps`` of a run with ``--seed seed`` (its training batches
  use ``seed``; the validation batch ``seed + 1`` is never poisoned)."""
  rows, loss = sharded_train.global_batch_rows, tasks.next_char_loss

  def poisoned_rows(tokens, index, batch_size, context, batch_seed):
    out = rows(tokens, index, batch_size, context, batch_seed)
    if poison_rows and batch_seed == seed and index + 1 in steps:
      out = out * 0 - 1
    return out

  def nan_loss(model, batch):
    bad = jnp.any(batch < 0)
    return loss(model, jnp.maximum(batch, 0)) * jnp.where(bad, jnp.nan, 1.0)

  sharded_train.global_batch_rows = poisoned_rows
  tasks.next_char_loss = nan_loss
  try:
    yield
  finally:
    sharded_train.global_batch_rows, tasks.next_char_loss = rows, loss
