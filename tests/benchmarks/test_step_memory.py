"""The whole-step memory benchmark (benchmarks/step_memory.py) and the
layer-at-a-time LNS step it recommends (madam_examples/lns_layers.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from madam_examples import lns_layers

RECOMMENDED = "lns factored, scanned + release + bf16 compute"


@pytest.fixture(scope="module")
def step_memory(benchmark):
  return benchmark("step_memory")


def _small(step_memory):
  s = step_memory.Shape(depth=2, width=64, vocab=96, seq=16)
  spec = step_memory.layered_spec(s)
  txs = step_memory.layered_txs(spec, step_memory._factored_lns)
  codes, scales = step_memory.encode_stacked(spec)
  tokens = jnp.asarray(
    np.random.default_rng(0).integers(0, s.vocab, (2, s.seq + 1)), jnp.int32
  )
  return txs, codes, scales, lns_layers.init(txs, codes), tokens


@pytest.mark.parametrize(
  "compute_dtype", [None, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)]
)
def test_release_step_gives_the_plain_steps_codes(step_memory, compute_dtype):
  txs, codes, scales, state, tokens = _small(step_memory)
  model, fmt = step_memory.MODEL, step_memory.INT8
  steps = {
    "release": lns_layers.train_step(
      model, txs, fmt, compute_dtype=compute_dtype
    ),
    "stacked gradients": lns_layers.train_step(
      model, txs, fmt, compute_dtype=compute_dtype, release=False
    ),
    "plain": lns_layers.reference_step(
      model, txs, fmt, compute_dtype=compute_dtype
    ),
  }
  out = {k: jax.jit(f)(codes, state, scales, tokens) for k, f in steps.items()}
  new, _, loss = out["release"]
  assert any(
    bool(jnp.any(a != b))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(codes))
  )  # the codes moved
  for name in ("stacked gradients", "plain"):
    other, _, other_loss = out[name]
    assert float(loss) == float(other_loss), name
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(other)):
      if jnp.issubdtype(a.dtype, jnp.integer):  # codes: the same, exactly
        np.testing.assert_array_equal(a, b, err_msg=name)
      else:  # Adam's float biases: XLA fuses the step differently
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9, err_msg=name)
      assert a.dtype == b.dtype


def test_quick_main_writes_the_whole_step(step_memory, harness, tmp_path):
  results = step_memory.main(
    [
      "--quick",
      "--configs",
      f"adam;{RECOMMENDED}",
      "--out",
      str(tmp_path),
    ],
    log=lambda *_: None,
  )
  data = json.loads((tmp_path / "step_memory.json").read_text())
  assert tuple(data["machine"]) == harness.MACHINE_KEYS
  (model,) = data["results"]
  rows = {r["config"]: r for r in data["results"][model]["rows"]}
  assert list(rows) == ["adam", RECOMMENDED]
  for r in rows.values():
    assert r["whole_step"] == (
      r["arguments"] + r["outputs"] - r["aliased"] + r["temporaries"]
    )
  assert rows["adam"]["at_rest_per_param"] == pytest.approx(12.0, abs=1e-3)
  assert rows[RECOMMENDED]["at_rest_per_param"] < 1.2
  md = (tmp_path / "step_memory.md").read_text()
  assert f"| **{RECOMMENDED}** |" in md
  assert data["results"] == json.loads(json.dumps(results["results"]))


# The recommended path's whole step, bytes, on the 768-wide decoder, as
# compiled on the reference CPU (depths 1 to 4): one block needs more than
# two (a scan of length one compiles differently).
_MEASURED = {1: 208767108, 2: 205918864, 3: 213548252, 4: 221177640}


def _fake_measure(calls):
  def measure(name, s):
    calls.append(s.depth)
    if s.depth in _MEASURED:
      whole = _MEASURED[s.depth]
    else:
      whole = _MEASURED[2] + (s.depth - 2) * (_MEASURED[3] - _MEASURED[2])
    return dict(config=name, parameters=s.depth, whole_step=whole)

  return measure


@pytest.mark.parametrize("gib", [0.19, 0.195, 0.2, 2.0, 16.0])
def test_budget_search_finds_the_largest_depth(step_memory, monkeypatch, gib):
  calls = []
  monkeypatch.setattr(step_memory, "measure", _fake_measure(calls))
  budget = gib * 2**30
  row = step_memory.largest_depth(
    RECOMMENDED, step_memory.Shape(), budget, lambda *_: None
  )
  whole = _fake_measure([])
  fits = [
    d
    for d in range(1, 3000)
    if whole(RECOMMENDED, step_memory.Shape(depth=d))["whole_step"] <= budget
  ]
  assert row["depth"] == max(fits, default=0)
  if row["depth"]:
    assert row["whole_step"] <= budget < row["next_whole_step"]
  assert len(calls) == len(set(calls)) <= 12  # each depth compiled once


def test_budget_search_refuses_a_step_that_does_not_grow(
  step_memory, monkeypatch
):
  monkeypatch.setattr(
    step_memory,
    "measure",
    lambda name, s: dict(config=name, whole_step=1000),
  )
  with pytest.raises(ValueError, match="must grow with the depth"):
    step_memory.largest_depth(
      RECOMMENDED, step_memory.Shape(), 2**30, lambda *_: None
    )
