"""Smoke test of ``benchmarks/step_time.py`` and its state-memory accounting."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax


@pytest.fixture(scope="module")
def step_time(benchmark):
  return benchmark("step_time")


@pytest.fixture(scope="module")
def quick_results(step_time, tmp_path_factory):
  out = tmp_path_factory.mktemp("step_time")
  results = step_time.main(["--quick", "--out", str(out)], log=lambda *_: None)
  return results, out


def test_quick_run_writes_table_and_json(quick_results, harness):
  results, out = quick_results
  md = (out / f"step_time_{jax.default_backend()}.md").read_text()
  assert "| madam |" in md and "| adam |" in md
  saved = json.loads(
    (out / f"step_time_{jax.default_backend()}.json").read_text()
  )
  assert tuple(saved["machine"]) == harness.MACHINE_KEYS
  assert saved["machine"]["command"] == "python benchmarks/step_time.py --quick"
  assert saved["trees"] == json.loads(json.dumps(results["trees"]))
  names = {r["optimizer"] for tr in results["trees"] for r in tr["rows"]}
  assert {"madam", "madam_bf16", "adam", "sgd", "lion", "fromage"} <= names
  for tr in results["trees"]:
    assert tr["bandwidth"]["copy"]["gbps"] > 0
    for r in tr["rows"]:
      assert r["step_ms"] > 0 and r["floor_ms"] > 0 and r["compile_s"] > 0
      assert np.isfinite(r["x_floor"])


def _expected_madam_state_bytes(params, state_bytes_per_param):
  n = sum(p.size for p in jax.tree.leaves(params))
  n_leaves = len(jax.tree.leaves(params))
  # One second-moment buffer, one f32 bound per leaf, two int32 step counts.
  return state_bytes_per_param * n + 4 * n_leaves + 2 * 4


@pytest.mark.parametrize(
  "state_dtype, per_param", [(None, 4), (jnp.bfloat16, 2)]
)
def test_madam_state_is_one_buffer_plus_scalars(
  step_time, state_dtype, per_param
):
  params = step_time.random_tree(step_time.mlp_shapes((8, 16, 3)), seed=0)
  state = madam_optax.madam(state_dtype=state_dtype).init(params)
  total = step_time.harness.tree_bytes(state)
  assert total == _expected_madam_state_bytes(params, per_param)
  n = sum(p.size for p in jax.tree.leaves(params))
  assert step_time.full_buffer_bytes(state, params) == per_param * n


def test_quick_run_reports_measured_state_bytes(quick_results):
  results, _ = quick_results
  for tr in results["trees"]:
    rows = {r["optimizer"]: r for r in tr["rows"]}
    assert rows["madam"]["state_full_bytes_per_param"] == 4
    assert rows["madam_bf16"]["state_full_bytes_per_param"] == 2
    assert rows["adam"]["state_full_bytes_per_param"] == 8
    assert rows["sgd"]["state_full_bytes_per_param"] == 0
    assert (
      rows["madam"]["state_bytes"] == 4 * tr["params"] + 4 * tr["leaves"] + 8
    )
    assert rows["madam"]["bytes_per_param_moved"] == 20
    assert rows["madam_bf16"]["bytes_per_param_moved"] == 16
    assert rows["adam"]["bytes_per_param_moved"] == 28


def test_byte_accounting_rejects_unknown_optimizer(step_time):
  with pytest.raises(ValueError, match="no byte accounting"):
    step_time.bytes_per_param("rmsprop", 4.0)


def test_fusion_count_of_sgd_step(step_time):
  spec = {"w": jax.ShapeDtypeStruct((64,), jnp.float32)}
  compiled, _, _ = step_time.compile_step(lambda: optax.sgd(0.1), spec, spec)
  assert step_time.count_fusions(compiled.as_text()) >= 1


def test_options_and_defaults(step_time):
  args = step_time.parse_args(["--trees", "mlp", "--sizes", "", "--out", "-"])
  assert (args.trees, args.sizes, args.out) == ("mlp", "", None)
  assert args.name == f"step_time_{jax.default_backend()}"
  assert args.repeats is None and args.compile_repeats is None
