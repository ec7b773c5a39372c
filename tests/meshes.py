"""Shared set-up of the sharding tests: the 2 x 4 mesh, a small NNX model,
and the collectives a compiled program's text is searched for."""

import re

import jax

COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "collective-permute",
  "all-to-all",
)


def collectives_in(compiled_text):
  """The collectives (sorted names) in a compiled program's HLO text."""
  return sorted(
    {
      op
      for op in COLLECTIVES
      if re.search(rf"\b{op}(-start)?\(", compiled_text)
    }
  )


def make_mesh(devices, axis_type=jax.sharding.AxisType.Explicit):
  """A ("data", "fsdp") mesh of 2 x 4 of the eight simulated devices."""
  return jax.make_mesh(
    (2, 4), ("data", "fsdp"), devices=devices, axis_types=(axis_type, axis_type)
  )


def partitioned_mlp(bias_init):
  """A Flax NNX 16 -> 32 -> 8 MLP with ``nnx.with_partitioning`` variables.

  The first kernel is annotated ``(None, "fsdp")``, its bias ``("fsdp",)``
  (initialised by ``bias_init``, e.g. ``nnx.initializers.zeros_init()``),
  the second kernel ``("fsdp", None)``. Build it under ``jax.set_mesh``.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  init = nnx.initializers.lecun_normal()

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(
        16,
        32,
        rngs=rngs,
        kernel_init=nnx.with_partitioning(init, (None, "fsdp")),
        bias_init=nnx.with_partitioning(bias_init, ("fsdp",)),
      )
      self.l2 = nnx.Linear(
        32,
        8,
        use_bias=False,
        rngs=rngs,
        kernel_init=nnx.with_partitioning(init, ("fsdp", None)),
      )

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  return Model(nnx.Rngs(0))
