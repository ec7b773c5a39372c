"""The benchmarks' shared harness: record, options, writer, byte counting."""

import doctest
import json
import math
import pathlib

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest


def test_docstring_examples_run(harness):
  failed, attempted = doctest.testmod(harness, optionflags=doctest.ELLIPSIS)
  assert attempted >= 15 and failed == 0


# ------------------------------------------------------------ machine record


def test_machine_record_has_one_set_of_keys(harness):
  record = harness.machine_record(
    "python benchmarks/x.py", packages=["numpy", "not_a_module"]
  )
  assert tuple(record) == harness.MACHINE_KEYS
  assert record["command"] == "python benchmarks/x.py"
  assert record["date_utc"].endswith(" UTC") and len(record["date_utc"]) == 20
  assert record["cpu"] and record["cores"] >= 1 and record["platform"]
  assert record["backend"] == jax.default_backend()
  assert (
    record["devices"]
    == f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  )
  v = record["versions"]
  assert tuple(v)[: len(harness.VERSION_KEYS)] == harness.VERSION_KEYS
  assert v["jax"] == jax.__version__ and v["optax"] == optax.__version__
  assert v["numpy"] == np.__version__ and v["not_a_module"] is None
  assert len(record["load_average_at_start"]) == 3
  assert record["load_average_at_end"] is None
  json.dumps(record)  # plain JSON


def test_machine_record_without_devices_leaves_them_open(harness):
  record = harness.machine_record("c", devices=False)
  assert record["backend"] is None and record["devices"] is None
  assert tuple(record) == harness.MACHINE_KEYS


@pytest.mark.parametrize(
  "legacy, expected",
  [
    # step_time: memory, a device list, load averages outside the record.
    (
      {
        "machine": {
          "date": "2026-11-22 22:39 UTC",
          "cpu": "X",
          "cores": 2,
          "python": "3.11.7",
          "jax": "0.10.2",
          "optax": "0.2.8",
          "madam_optax": "0.1.0",
          "backend": "cpu",
          "devices": ["cpu"],
          "gpu_lent": False,
          "flax": "0.12.8",
          "memory_gib": 23.5,
        },
        "load_before": [1.2, 3.48, 4.75],
        "load_after": [2.07, 2.17, 3.53],
        "command": "python benchmarks/step_time.py --repeats 11",
      },
      {
        "command": "python benchmarks/step_time.py --repeats 11",
        "date_utc": "2026-11-22 22:39 UTC",
        "cpu": "X",
        "cores": 2,
        "memory_gib": 23.5,
        "platform": None,
        "versions": {
          "python": "3.11.7",
          "jax": "0.10.2",
          "jaxlib": None,
          "optax": "0.2.8",
          "flax": "0.12.8",
          "madam_optax": "0.1.0",
        },
        "backend": "cpu",
        "devices": "cpu",
        "load_average_at_start": [1.2, 3.48, 4.75],
        "load_average_at_end": [2.07, 2.17, 3.53],
      },
    ),
    # lr_sweep: date_utc without "UTC", the command in the settings.
    (
      {
        "machine": {
          "cpu": "X",
          "cores": 2,
          "platform": "Linux",
          "jax": "0.1",
          "backend": "cpu",
          "date_utc": "2026-11-22 21:37",
          "load_average_at_start": [9.5],
          "load_average_at_end": [7],
        },
        "settings": {"command": "python benchmarks/lr_sweep.py --name a"},
      },
      {
        "command": "python benchmarks/lr_sweep.py --name a",
        "date_utc": "2026-11-22 21:37 UTC",
        "cpu": "X",
        "cores": 2,
        "memory_gib": None,
        "platform": "Linux",
        "versions": {
          "python": None,
          "jax": "0.1",
          "jaxlib": None,
          "optax": None,
          "flax": None,
          "madam_optax": None,
        },
        "backend": "cpu",
        "devices": None,
        "load_average_at_start": [9.5],
        "load_average_at_end": [7],
      },
    ),
    # checkpoint_bytes: a further package's version.
    (
      {"machine": {"date": "d UTC", "orbax_checkpoint": "0.12.8"}},
      {
        "command": None,
        "date_utc": "d UTC",
        "cpu": None,
        "cores": None,
        "memory_gib": None,
        "platform": None,
        "versions": {
          "python": None,
          "jax": None,
          "jaxlib": None,
          "optax": None,
          "flax": None,
          "madam_optax": None,
          "orbax_checkpoint": "0.12.8",
        },
        "backend": None,
        "devices": None,
        "load_average_at_start": None,
        "load_average_at_end": None,
      },
    ),
  ],
)
def test_upgrade_record_maps_legacy_keys(harness, legacy, expected):
  upgraded = harness.upgrade_record(legacy)
  assert upgraded["machine"] == expected
  assert tuple(upgraded["machine"]) == harness.MACHINE_KEYS
  for key in legacy:  # the rest is left as it was
    if key != "machine":
      assert upgraded[key] == legacy[key]
  assert harness.upgrade_record(upgraded) == upgraded


def test_committed_results_records_upgrade(harness):
  paths = sorted(harness.RESULTS_DIR.glob("*.json"))
  assert len(paths) >= 7
  for path in paths:
    record = harness.read_results(path)["machine"]
    assert tuple(record) == harness.MACHINE_KEYS, path
    assert record["cpu"] and record["date_utc"].endswith("UTC"), path
    assert record["versions"]["jax"], path
    assert record["command"] is None or record["command"].startswith(
      "python benchmarks/"
    ), path
    harness.machine_markdown(record)


def test_machine_markdown_says_what_was_not_recorded(harness):
  record = dict.fromkeys(harness.MACHINE_KEYS)
  record.update(
    cpu="X",
    cores=2,
    versions={"jax": "0.1", "flax": None},
    load_average_at_start=[1.0, 2.0, 3.0],
  )
  text = harness.machine_markdown(record)
  assert "- command: `not recorded`" in text
  assert "- machine: X, 2 cores\n- operating system: not recorded" in text
  assert "- versions: jax 0.1\n" in text
  assert "at start / end: [1.0, 2.0, 3.0] / not recorded" in text


# ---------------------------------------------------------------- options


def test_command_line_drops_the_output_folder(harness):
  argv = ["--quick", "--out", "a b", "--steps", "3", "--out=c", "--name", "x"]
  assert (
    harness.command_line("/some/where/benchmarks/s.py", argv)
    == "python benchmarks/s.py --quick --steps 3 --name x"
  )
  assert harness.command_line("s.py", None) == "python benchmarks/s.py"
  assert (
    harness.command_line("s.py", ["--tasks", "a b"])
    == "python benchmarks/s.py --tasks 'a b'"
  )


@pytest.mark.parametrize(
  "argv, env, quick, out",
  [
    ([], None, False, "results"),
    (["--quick"], None, True, None),
    ([], "1", True, None),
    (["--quick", "--out", "d"], None, True, "d"),
    (["--out", "-"], None, False, None),
    (["--quick", "--replot"], None, True, "results"),
  ],
)
def test_common_options(harness, monkeypatch, argv, env, quick, out):
  if env is None:
    monkeypatch.delenv("MADAM_QUICK", raising=False)
  else:
    monkeypatch.setenv("MADAM_QUICK", env)
  parser = harness.argument_parser("One line.\n\nMore.", name="stem")
  parser.add_argument("--steps", type=int, default=5)
  args = harness.parse_args(parser, argv + ["--steps", "7"], "benchmarks/s.py")
  assert args.quick is quick and args.steps == 7 and args.name == "stem"
  if out == "results":
    assert args.out == harness.RESULTS_DIR
  else:
    assert args.out == (None if out is None else pathlib.Path(out))
  assert args.command.startswith("python benchmarks/s.py")
  assert "--out" not in args.command
  assert parser.description == "One line."


def test_unknown_option_is_refused(harness):
  parser = harness.argument_parser(None, name="stem")
  with pytest.raises(SystemExit):
    harness.parse_args(parser, ["--no-such-option"], "s.py")


# ---------------------------------------------------------------- writer


def _report(harness, figure=False):
  def body(results):
    return "| n |\n|---|\n" + "".join(f"| {x} |\n" for x in results["values"])

  def plot(results, plt):
    fig, ax = plt.subplots()
    ax.plot(results["values"])
    return fig

  return harness.Report("A title", body, plot if figure else None)


def test_writer_writes_json_markdown_and_figure(harness, tmp_path):
  results = {
    "machine": harness.machine_record("python benchmarks/s.py"),
    "values": np.arange(3, dtype=np.float32),
    "nan": float("nan"),
  }
  paths = harness.write_results(
    tmp_path,
    "stem",
    results,
    _report(harness, figure=True),
    log=lambda *_: None,
  )
  assert [p.name for p in paths] == ["stem.json", "stem.md", "stem.png"]
  saved = json.loads((tmp_path / "stem.json").read_text())
  assert saved["values"] == [0.0, 1.0, 2.0] and math.isnan(saved["nan"])
  assert tuple(saved["machine"]) == harness.MACHINE_KEYS
  assert len(saved["machine"]["load_average_at_end"]) == 3  # stamped
  md = (tmp_path / "stem.md").read_text()
  assert md.startswith("# A title\n\n- command: `python benchmarks/s.py`\n")
  assert "| 0.0 |\n| 1.0 |\n| 2.0 |" in md
  assert md.endswith("Raw numbers: `stem.json`. Figure: `stem.png`.\n")
  assert (tmp_path / "stem.png").read_bytes()[:4] == b"\x89PNG"

  # --replot: the same Markdown again from the JSON; the JSON untouched.
  (tmp_path / "stem.md").unlink()
  before = (tmp_path / "stem.json").read_text()
  harness.replot(
    tmp_path, "stem", _report(harness, figure=True), log=lambda *_: None
  )
  assert (tmp_path / "stem.md").read_text() == md
  assert (tmp_path / "stem.json").read_text() == before


def test_writer_without_a_folder_logs_the_markdown(harness, tmp_path):
  logged = []
  results = {"machine": harness.machine_record("c"), "values": [1]}
  assert (
    harness.write_results(
      None, "stem", results, _report(harness), log=logged.append
    )
    == []
  )
  assert len(logged) == 1 and logged[0].startswith("# A title\n")
  assert list(tmp_path.iterdir()) == []


def test_writer_refuses_what_json_cannot_hold(harness, tmp_path):
  results = {"machine": harness.machine_record("c"), "values": [object()]}
  with pytest.raises(TypeError, match="not JSON serialisable"):
    harness.write_results(tmp_path, "stem", results, _report(harness))


# ---------------------------------------------------------------- counting


def test_tree_bytes_by_hand(harness):
  tree = {
    "f32": jnp.zeros((3, 4), jnp.float32),  # 48
    "bf16": jnp.zeros((2, 5), jnp.bfloat16),  # 20
    "i8": jnp.zeros((7,), jnp.int8),  # 7
    "i16": np.zeros((2, 2), np.int16),  # 8 (NumPy counts too)
    "count": jnp.zeros((), jnp.int32),  # 4
    "key": jax.random.key(0),  # 8 (two uint32)
    "none": None,  # not a leaf
    "python": 3.0,  # no storage
  }
  assert harness.tree_bytes(tree) == 48 + 20 + 7 + 8 + 4 + 8
  assert (
    harness.tree_bytes(tree, where=lambda x: np.ndim(x) >= 2) == 48 + 20 + 8
  )
  assert harness.array_count(tree) == 6
  assert harness.param_count(tree) == 12 + 10 + 7 + 4 + 1 + 1
  assert harness.tree_bytes({}) == 0 and harness.param_count([]) == 0


def test_bytes_per_device_by_hand(harness, eight_devices):
  mesh = jax.sharding.Mesh(np.asarray(eight_devices[:4]), ("x",))
  tree = {
    "split": jax.device_put(
      jnp.zeros((8, 6)),  # 192 B: 48 each
      NamedSharding(mesh, P("x")),
    ),
    "copied": jax.device_put(
      jnp.zeros(5, jnp.int8),  # 5 on each
      NamedSharding(mesh, P()),
    ),
  }
  per_device = harness.bytes_per_device(tree)
  assert per_device == {d: 48 + 5 for d in eight_devices[:4]}
  assert harness.tree_bytes(tree) == 192 + 5  # global sizes


def test_mlp_params_and_one_step(harness):
  params = harness.mlp_params((6, 4, 3), seed=1)
  assert harness.param_count(params) == 6 * 4 + 4 + 4 * 3 + 3
  assert not np.any(params["dense0"]["bias"])
  assert 0.3 < float(np.std(params["dense0"]["kernel"])) * np.sqrt(6) < 2.0
  np.testing.assert_array_equal(
    params["dense1"]["kernel"],
    harness.mlp_params((6, 4, 3), 1)["dense1"]["kernel"],
  )
  tx = optax.adam(0.1)
  grads = jax.tree.map(jnp.ones_like, params)
  new, state = harness.update_and_apply(tx, grads, tx.init(params), params)
  expected = optax.apply_updates(
    params, tx.update(grads, tx.init(params), params)[0]
  )
  jax.tree.map(np.testing.assert_array_equal, new, expected)
  assert int(state[0].count) == 1


def test_quartiles(harness):
  assert harness.quartiles([4.0, 1.0, 3.0, 2.0, 5.0]) == (2.0, 3.0, 4.0)
  assert harness.quartiles([7.0]) == (7.0, 7.0, 7.0)


def test_stored_for_training(harness):
  mo = harness.madam_optax
  params = harness.mlp_params((5, 4))
  stored, tx = harness.stored_for_training(
    params, optax.sgd(0.1), additive=False
  )
  assert stored == {"params": params} and isinstance(
    tx, optax.GradientTransformation
  )
  fmt = mo.LNSFormat.spanning(4096)
  stored, tx = harness.stored_for_training(params, mo.lns_madam(fmt), fmt)
  codes = stored["params"]["dense0"]
  assert (
    codes["kernel"].dtype == jnp.int16 and codes["bias"].dtype == jnp.float32
  )
  assert stored["scales"]["dense0"]["bias"] is None
  # 4096-level codes: 2 B per kernel entry; the float bias: 4 B.
  assert harness.tree_bytes(stored["params"]) == 2 * 20 + 4 * 4
  # The zero bias goes to Adam (it moves by ~1e-3); the codes to lns_madam.
  grads = {"dense0": {"kernel": jnp.ones((5, 4)), "bias": jnp.ones(4)}}
  new, _ = harness.update_and_apply(
    tx, grads, tx.init(stored["params"]), stored["params"]
  )
  np.testing.assert_allclose(new["dense0"]["bias"], -1e-3, rtol=1e-3)
  assert new["dense0"]["kernel"].dtype == jnp.int16


@pytest.mark.parametrize("out", ["/proc/x", "/etc/passwd"])
def test_an_unwritable_out_fails_before_any_work(harness, out, capsys):
  parser = harness.argument_parser("A script.", "demo")
  with pytest.raises(SystemExit) as exit_info:
    harness.parse_args(parser, ["--out", out], "benchmarks/demo.py")
  assert exit_info.value.code == 2
  (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
  assert "argument --out:" in line and out in line
