"""``benchmarks/lns_bits.py``: accuracy versus LNS bit width, quick mode."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def lns_bits(benchmark):
  return benchmark("lns_bits")


@pytest.mark.slow
def test_quick_run_writes_report(lns_bits, harness, tmp_path):
  results = lns_bits.main(
    ["--quick", "--out", str(tmp_path)], log=lambda *_: None
  )
  md = (tmp_path / "lns_bits.md").read_text()
  assert "| lns_madam_det | lns_madam_stoch | adam_proj | sgd_proj |" in md
  assert "smallest width within 0.5 points" in md
  assert (tmp_path / "lns_bits.png").read_bytes()[:4] == b"\x89PNG"
  data = json.loads((tmp_path / "lns_bits.json").read_text())
  assert tuple(data["machine"]) == harness.MACHINE_KEYS
  assert data["args"]["seeds"] == 2 and data["args"]["steps"] == 30
  rows = results["results"]["mlp"]["rows"]
  assert {r["method"] for r in rows} == {
    "lns_madam_det",
    "lns_madam_stoch",
    "adam_proj",
    "sgd_proj",
  }
  # The LNS-Madam runs trained integer codes (the dtype the loop carries).
  assert {r["codes"] for r in rows if r["method"].startswith("lns")} == {"int8"}
  assert all(len(r["accs"]) == 2 for r in rows)
  assert {(r["bits"], r["levels"]) for r in rows} == {(4, 16)}


def method_tx(lns_bits, method, fmt, params):
  """``method``'s optimizer for ``params``, built as the shared loop builds
  it (``loop.task_optimizers``, on a task whose parameters are ``params``)."""
  loop = lns_bits.loop
  optimizer, learning_rate, options = lns_bits.method_optimizer(method, fmt)
  task = loop.Task(
    "toy",
    "",
    "accuracy",
    True,
    3.0,
    1,
    1,
    {},
    lambda key: {"model": params},
    {},
    None,
    None,
  )
  return loop.task_optimizers(
    task, optimizer, learning_rate, seed=0, **options
  )["model"]


@pytest.mark.parametrize(
  "method",
  [
    "madam",
    "adam",
    "sgd",
    "adam_proj",
    "sgd_proj",
    "lns_madam_det",
    "lns_madam_stoch",
  ],
)
def test_optimizers_train_the_leaves_they_should(lns_bits, harness, method):
  """The weights by the method (LNS codes stay int8, projections land on the
  grid); the zero-initialised bias additively in every method."""
  mo = lns_bits.madam_optax
  fmt = mo.LNSFormat.spanning(127, log_range=2.0)  # a step: ~0.6 levels
  params = {"w": jnp.linspace(0.4, 0.6, 6).reshape(2, 3), "b": jnp.zeros(3)}
  grads = {"w": -jnp.ones((2, 3)), "b": jnp.ones(3)}  # |w| up, b down
  tx = method_tx(lns_bits, method, fmt, params)
  step = harness.update_and_apply
  if method.startswith("lns"):
    codes, scales = mo.lns_encode_tree(params, fmt)
    new, _ = step(tx, grads, tx.init(codes), codes)
    assert new["w"].dtype == codes["w"].dtype == jnp.int8
    assert bool((new["w"] != codes["w"]).any())
    w0, w1 = (mo.lns_decode(c["w"], scales["w"], fmt) for c in (codes, new))
    assert bool((w1 >= w0).all())
  else:
    new, _ = step(tx, grads, tx.init(params), params)
    if method.endswith("_proj"):
      bound = 3.0 * jnp.sqrt(jnp.mean(params["w"] ** 2))
      on_grid = mo.lns_decode(*mo.lns_encode(new["w"], fmt, bound), fmt)
      np.testing.assert_allclose(on_grid, new["w"], rtol=1e-6)
    else:
      assert bool((new["w"] > params["w"]).all())
  assert bool((new["b"] < 0).all())


def test_lns_runs_train_int8_or_int16_codes(lns_bits):
  task = lns_bits.lns_digits.digits_task("mlp", 10)
  mo = lns_bits.madam_optax
  assert lns_bits.code_bits(task, mo.LNSFormat.spanning(127)) == [8]
  assert lns_bits.code_bits(task, mo.LNSFormat.spanning(4096)) == [16]


def test_smallest_bits_needs_every_wider_width_within_tolerance(lns_bits):
  rows = [
    dict(method="m", bits=b, mean=m)
    for b, m in [(3, 97.8), (4, 90.0), (5, 97.7), (6, 98.0), (7, 97.9)]
  ]
  rows.append(dict(method="m", bits=None, mean=99.0))  # 127 levels
  assert lns_bits.smallest_bits(rows, 98.0, "m") == 5
  assert lns_bits.smallest_bits(rows, 99.0, "m") is None
  assert lns_bits.smallest_bits(rows, 90.0, "m") == 3
