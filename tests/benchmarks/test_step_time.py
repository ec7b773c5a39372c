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
    step_time.bytes_per_param("adagrad", 4.0)


def test_fusion_count_of_sgd_step(step_time):
  spec = {"w": jax.ShapeDtypeStruct((64,), jnp.float32)}
  compiled, _, _ = step_time.compile_step(lambda: optax.sgd(0.1), spec, spec)
  assert step_time.count_fusions(compiled.as_text()) >= 1


def test_options_and_defaults(step_time):
  args = step_time.parse_args(["--trees", "mlp", "--sizes", "", "--out", "-"])
  assert (args.trees, args.sizes, args.out) == ("mlp", "", None)
  assert args.name == f"step_time_{jax.default_backend()}"
  assert args.repeats is None and args.compile_repeats is None


def test_quick_run_reports_paired_ratios(quick_results):
  results, out = quick_results
  for tr in results["trees"]:
    rows = {r["optimizer"]: r for r in tr["rows"]}
    assert rows["adam"]["x_adam_paired"] == 1.0
    assert rows["adam"]["x_adam_compile_paired"] == 1.0
    for r in tr["rows"]:
      assert r["x_adam_paired"] > 0 and r["x_adam_paired_cpu"] > 0
      assert r["cpu_ms"] >= 0
    assert rows["lns_madam"]["x_nearest_paired"] > 0
    assert "x_nearest_paired" not in rows["lns_madam_nearest"]
  md = (out / f"step_time_{jax.default_backend()}.md").read_text()
  assert "| tree | params | leaves | madam / adam |" in md


def test_paired_ratio_is_the_median_of_per_round_ratios(step_time):
  # Rounds 2 and 3 slowed both alike: the ratio of medians would be 1.5.
  assert step_time.paired_ratio([1.0, 4.0, 4.0], [1.0, 4.0, 2.0]) == 1.0


def _tree_result(name, params, leaves, **ratios):
  rows = [
    {"optimizer": "madam", "x_adam_paired": ratios["madam"]},
    {
      "optimizer": "lns_madam",
      "x_adam_paired": ratios["lns"],
      "x_nearest_paired": ratios["nearest"],
    },
  ]
  rows[0]["x_adam_compile_paired"] = ratios["compile"]
  return {"tree": name, "params": params, "leaves": leaves, "rows": rows}


def test_goals_apply_to_big_and_many_leaf_trees(step_time):
  results = {
    "trees": [
      _tree_result("small", 1e6, 3, madam=2, lns=2, nearest=2, compile=2),
      _tree_result("big", 2e7, 1, madam=0.7, lns=1.1, nearest=1.2, compile=2),
      _tree_result(
        "many", 2e7, 150, madam=0.9, lns=0.9, nearest=1.5, compile=1.1
      ),
    ]
  }
  goals = {(g["tree"], g["goal"]): g for g in step_time.goal_rows(results)}
  assert not any(tree == "small" for tree, _ in goals)
  assert ("big", "compile madam / adam") not in goals  # one leaf
  assert goals[("big", "madam / adam")]["met"]
  assert not goals[("big", "lns_madam / adam")]["met"]
  assert goals[("big", "lns_madam / adam")]["miss"] == pytest.approx(0.1)
  assert goals[("many", "compile madam / adam")]["met"]
  assert not goals[("many", "lns_madam / nearest")]["met"]
  table = "\n".join(step_time.goals_table(results))
  assert "| lns_madam / nearest | many | 1.50 | <= 1.25 | no | +20% |" in table


def test_optional_optimizers_run_when_named(step_time):
  results = step_time.main(
    [
      "--quick",
      "--out",
      "-",
      "--optimizers",
      "adam,madam,madam_chain,madam_parts_bound,rmsprop,lns_madam,"
      "lns_madam_threefry",
    ],
    log=lambda *_: None,
  )
  for tr in results["trees"]:
    rows = {r["optimizer"]: r for r in tr["rows"]}
    assert set(rows) == {
      "adam",
      "madam",
      "madam_chain",
      "madam_parts_bound",
      "rmsprop",
      "lns_madam",
      "lns_madam_threefry",
    }
    assert rows["madam_chain"]["bytes_per_param_moved"] == 20
    assert rows["madam_parts_bound"]["bytes_per_param_moved"] == 20
    # RMSprop: Madam's one full-size buffer, and its bytes.
    assert rows["rmsprop"]["state_full_bytes_per_param"] == 4
    assert rows["rmsprop"]["bytes_per_param_moved"] == 20
    assert rows["lns_madam_threefry"]["x_nearest_paired"] is None  # not run
