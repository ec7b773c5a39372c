"""Checkpoint and resume with Orbax (``madam_examples.checkpointing``).

The resume tests train N steps here, save, and continue in a *fresh process*
(this file run as a script: it has no state in common with the test but the
checkpoint folder). That process resumes, trains M more steps, saves step
N+M, takes one more step and is killed during the save of step N+M+1 (after
its arrays are written, inside Orbax's finalisation). Back here the test
checks that:

* the resumed N+M state is bit-identical to N+M uninterrupted steps (params,
  optimizer state, PRNG keys), for ``madam`` with a learning-rate schedule and
  for ``lns_madam`` with stochastic rounding (its PRNG key is in the state),
  on one device and on 8 simulated devices with sharded state restored onto
  the mesh with its shardings;
* the save cut short left its temporary folder, and neither
  ``latest_step`` nor ``maybe_restore`` takes it: step N+M is the latest;
* LNS codes are ``int8`` on disk (the stored zarr metadata, read with
  TensorStore, not through Orbax) and after restoring.

One worker process per configuration (each costs a JAX import).
"""

import glob
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from madam_examples import checkpointing
import madam_optax

N_STEPS, M_STEPS = 3, 4
CRASH_EXIT_CODE = 17
IN, OUT, BATCH = 16, 8, 32
FMT = madam_optax.LNSFormat.spanning(127)  # int8 codes


def _config(kind):
  return {
    "problem": kind,
    "schedule": [0.05, 0.01, N_STEPS + M_STEPS],
    "lns": [FMT.levels, FMT.base] if kind == "lns" else None,
  }


# ---------------------------------------------------------------- the problem
# Shared by the test and the worker process: it must be deterministic.


def _schedule():
  return optax.linear_schedule(0.05, 0.01, N_STEPS + M_STEPS)


def _loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def make_problem(kind, mesh=None):
  """A fresh training state and its jitted step, for ``madam`` or ``lns``."""
  k_w, k_true = jax.random.split(jax.random.key(0))
  params = {"w": jax.random.normal(k_w, (IN, OUT)) / 4, "b": jnp.zeros(OUT)}
  w_true = jax.random.normal(k_true, (IN, OUT)) / 4
  if kind == "madam":
    tx = madam_optax.with_additive_fallback(
      params, madam_optax.madam(_schedule()), optax.adam(1e-2)
    )
    state = {"params": params}
    value_and_grad = lambda st, x, y: jax.value_and_grad(_loss)(
      st["params"], x, y
    )
  else:
    codes, scales = madam_optax.lns_encode_tree(params, FMT)
    tx = madam_optax.with_additive_fallback(
      codes,
      madam_optax.lns_madam(FMT, _schedule(), rounding="stochastic", seed=1),
      optax.adam(1e-2),
    )
    state = {"params": codes, "scales": scales}
    value_and_grad = lambda st, x, y: madam_optax.lns_value_and_grad(
      _loss, st["scales"], FMT
    )(st["params"], x, y)
  state["opt_state"] = tx.init(state["params"])
  state["key"] = jax.random.key(7)  # data sampling: part of the state

  def step(st):
    key, sub = jax.random.split(st["key"])
    x = jax.random.normal(sub, (BATCH, IN))
    _, grads = value_and_grad(st, x, x @ w_true)
    updates, opt_state = tx.update(grads, st["opt_state"], st["params"])
    return {
      **st,
      "params": optax.apply_updates(st["params"], updates),
      "opt_state": opt_state,
      "key": key,
    }

  if mesh is None:
    return state, jax.jit(step)
  shardings = jax.tree.map(lambda x: _sharding(x, mesh), state)
  state = jax.device_put(state, shardings)
  return state, jax.jit(
    step, in_shardings=(shardings,), out_shardings=shardings
  )


def _sharding(x, mesh):
  """Leading axis split over the 8 devices when it divides, else replicated."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  if x.ndim and x.shape[0] % mesh.size == 0:
    return NamedSharding(mesh, P("x"))
  return NamedSharding(mesh, P())


def _mesh(devices):
  return jax.sharding.Mesh(np.array(devices[:8]), ("x",))


def _raw(tree):
  """Typed PRNG keys as their data, for exact comparisons."""
  return jax.tree.map(
    lambda x: (
      jax.random.key_data(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      else x
    ),
    tree,
  )


# ---------------------------------------------------------------- worker


def worker(kind, devices, directory, until):
  """Resume from ``directory``, train to ``until``, save; crash in the next save."""
  mesh = _mesh(jax.devices()) if devices == 8 else None
  fresh, step = make_problem(kind, mesh)
  state, start = checkpointing.maybe_restore(
    directory, fresh, config=_config(kind)
  )
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(fresh)):
    assert got.sharding == want.sharding, (got.sharding, want.sharding)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
  with checkpointing.Checkpointer(
    directory, every=1000, config=_config(kind)
  ) as ckpt:
    for _ in range(start, until):
      state = step(state)
    ckpt.maybe_save(until, state, force=True)
  state = step(state)

  # Die the way a preempted machine does, once every array of step until+1
  # is written but before Orbax finalises (commit marker + atomic rename).
  # The hook is Orbax-internal: without it, die as soon as the background
  # save has started instead.
  async def crash(*args, **kwargs):
    del args, kwargs
    print("killed while saving", flush=True)
    os._exit(CRASH_EXIT_CODE)

  try:
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

    atomicity.AtomicRenameTemporaryPath.finalize  # pylint: disable=pointless-statement
    atomicity.AtomicRenameTemporaryPath.finalize = crash
    atomicity.CommitFileTemporaryPath.finalize = crash
  except (ImportError, AttributeError):
    ckpt = checkpointing.Checkpointer(directory, every=1000)
    ckpt.maybe_save(until + 1, state, force=True)
    print("killed while saving (no finalize hook)", flush=True)
    os._exit(CRASH_EXIT_CODE)
  with checkpointing.Checkpointer(directory, every=1000) as ckpt:
    ckpt.maybe_save(until + 1, state, force=True)
  raise AssertionError("the save should have been killed")


def _run_worker(kind, devices, directory, until):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )
  return subprocess.run(
    [sys.executable, __file__, kind, str(devices), str(directory), str(until)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


# ---------------------------------------------------------------- resume tests


def _resume_and_check(kind, tmp_path, devices=None):
  mesh = _mesh(devices) if devices else None
  state, step = make_problem(kind, mesh)
  reference = state
  for i in range(N_STEPS + M_STEPS):
    reference = step(reference)
    if i + 1 == N_STEPS:
      checkpointing.save(tmp_path, N_STEPS, reference, config=_config(kind))

  proc = _run_worker(kind, 8 if devices else 1, tmp_path, N_STEPS + M_STEPS)
  assert proc.returncode == CRASH_EXIT_CODE, proc.stdout + proc.stderr
  assert f"Resumed from step {N_STEPS} in {tmp_path}" in proc.stdout
  assert "killed while saving" in proc.stdout

  # The save of step N+M+1 was cut short: its temporary folder is there...
  partial = glob.glob(os.path.join(tmp_path, f"{N_STEPS + M_STEPS + 1}.*tmp*"))
  if "no finalize hook" not in proc.stdout:
    assert partial, os.listdir(tmp_path)
  # ... and is never taken for a checkpoint.
  assert checkpointing.all_steps(tmp_path) == [N_STEPS, N_STEPS + M_STEPS]
  assert checkpointing.latest_step(tmp_path) == N_STEPS + M_STEPS

  fresh, _ = make_problem(kind, mesh)
  restored, at = checkpointing.maybe_restore(
    tmp_path, fresh, config=_config(kind)
  )
  assert at == N_STEPS + M_STEPS
  chex.assert_trees_all_equal(_raw(restored), _raw(reference))  # bitwise
  chex.assert_trees_all_equal_dtypes(_raw(restored), _raw(reference))
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(reference)):
    assert got.sharding == want.sharding
  # Not a trivial match: training moved the weights and advanced the keys.
  assert not np.array_equal(restored["params"]["w"], fresh["params"]["w"])
  return restored


def test_madam_schedule_resumes_bit_identically_in_fresh_process(tmp_path):
  _resume_and_check("madam", tmp_path)


def test_lns_madam_stochastic_resumes_bit_identically_and_stays_int8(tmp_path):
  restored = _resume_and_check("lns", tmp_path)
  assert restored["params"]["w"].dtype == jnp.int8
  # On disk, read through TensorStore (not Orbax): int8 zarr arrays.
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  spec = {
    "driver": "zarr",
    "kvstore": {
      "driver": "ocdbt",
      "base": "file://"
      + os.path.join(
        os.path.abspath(tmp_path), str(N_STEPS + M_STEPS), "default"
      ),
      "path": "params.w",
    },
  }
  stored = ts.open(spec).result()
  assert stored.dtype.numpy_dtype == np.int8
  assert stored.spec().to_json()["metadata"]["dtype"] == "|i1"
  np.testing.assert_array_equal(
    stored.read().result(), np.asarray(restored["params"]["w"])
  )


@pytest.mark.slow
def test_sharded_madam_and_lns_resume_on_eight_devices(tmp_path, eight_devices):
  for kind in ("madam", "lns"):
    restored = _resume_and_check(kind, tmp_path / kind, eight_devices)
    w = restored["params"]["w"]
    assert len(w.sharding.device_set) == 8
    assert w.addressable_shards[0].data.shape == (IN // 8, OUT)


# ---------------------------------------------------------------- in process


def test_docstring_examples(tmp_path, monkeypatch):
  import doctest  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # their folders
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  results = [doctest.testmod(checkpointing, optionflags=flags)]
  assert sum(r.attempted for r in results) >= 10
  assert all(r.failed == 0 for r in results)


def test_no_checkpoint_starts_from_step_zero(tmp_path, capsys):
  state = {"w": jnp.ones(3)}
  got, step = checkpointing.maybe_restore(tmp_path / "empty", state)
  assert step == 0 and got is state
  assert checkpointing.latest_step(tmp_path / "empty") is None
  assert (
    f"No checkpoint in {tmp_path / 'empty'}, starting from step 0"
    in capsys.readouterr().out
  )
  with pytest.raises(
    ValueError,
    match=r"no complete checkpoint .*\(leaf "
    r"\['w'\] is a jax.ShapeDtypeStruct",
  ):
    checkpointing.maybe_restore(
      tmp_path / "empty", jax.eval_shape(lambda: state)
    )


def test_partial_folder_is_ignored(tmp_path):
  """A copy of a complete step, renamed like Orbax's temporary folder and with
  its commit marker removed (what a crash before finalising leaves)."""
  import shutil  # pylint: disable=g-import-not-at-top

  state = {"w": jnp.arange(4.0), "key": jax.random.key(1)}
  checkpointing.save(tmp_path, 2, state)
  tmp = tmp_path / "5.orbax-checkpoint-tmp-1234567890"
  shutil.copytree(tmp_path / "2", tmp)
  os.remove(tmp / "commit_success.txt")
  assert checkpointing.latest_step(tmp_path) == 2
  restored, step = checkpointing.maybe_restore(tmp_path, state)
  assert step == 2
  chex.assert_trees_all_equal(_raw(restored), _raw(state))
  assert tmp.exists()  # readers leave it alone...
  with checkpointing.Checkpointer(tmp_path, every=1) as ckpt:
    ckpt.maybe_save(5, state)  # ... the next writer removes it
  assert not tmp.exists()
  assert checkpointing.all_steps(tmp_path) == [2, 5]


def test_config_mismatch_names_every_differing_setting(tmp_path):
  """What the tree cannot show: same shapes and dtypes, other settings."""
  params = {"w": jnp.ones((4, 3))}
  state = {"params": params, "opt_state": madam_optax.madam().init(params)}
  config = {
    "optimizer": "madam",
    "learning_rate": 0.01,
    "lns_levels": 127,
    "layers": (4, 3),
  }
  with checkpointing.Checkpointer(tmp_path, every=1, config=config) as ckpt:
    ckpt.maybe_save(1, state)
  restored, step = checkpointing.maybe_restore(tmp_path, state, config=config)
  assert step == 1  # tuples compare as saved (lists)
  other = {**config, "learning_rate": 0.02, "lns_levels": 100}
  del other["layers"]
  with pytest.raises(
    ValueError,
    match=(
      r"step 1 .* another configuration \(layers: checkpoint \[4, 3\], this "
      r"run \(not set\); learning_rate: checkpoint 0\.01, this run 0\.02; "
      r"lns_levels: checkpoint 127, this run 100\)"
    ),
  ):
    checkpointing.maybe_restore(tmp_path, state, config=other)
  # Without a config (or saved without one) only the tree is checked.
  chex.assert_trees_all_equal(checkpointing.restore(tmp_path, state), state)
  with pytest.raises(TypeError, match="not JSON serializable"):
    checkpointing.save(tmp_path, 2, state, config={"fmt": object()})


def test_every_part_and_alias_state_round_trips(tmp_path):
  """Each transform's state, after one update, restores bit for bit with
  its dtypes (counts, bf16 second moments, magnitude bounds, PRNG keys,
  injected hyperparameters), restored into a fresh ``init``."""
  params = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
  codes, _ = madam_optax.lns_encode_tree(params, FMT)
  grads = {"w": jax.random.normal(jax.random.key(1), (4, 3))}
  float_parts = {
    "second_moment_bf16": madam_optax.scale_by_second_moment(
      state_dtype=jnp.bfloat16
    ),
    "multiplicative_step": madam_optax.multiplicative_step(_schedule()),
    "clip_weight_magnitude": madam_optax.clip_weight_magnitude(),
    "log_quantise": madam_optax.log_quantise(FMT, rounding="stochastic"),
    "madam": madam_optax.madam(_schedule()),
    "inject_hyperparams": optax.inject_hyperparams(madam_optax.madam)(
      learning_rate=0.02
    ),
  }
  code_parts = {
    "lns_level_step": madam_optax.lns_level_step(FMT),
    "lns_madam_bf16": madam_optax.lns_madam(FMT, state_dtype=jnp.bfloat16),
  }
  cases = {n: (t, params) for n, t in float_parts.items()}
  cases.update({n: (t, codes) for n, t in code_parts.items()})
  # One compilation for all (each state after one update), one for the
  # fresh inits: the restore targets.
  updated = jax.jit(
    lambda: {n: t.update(grads, t.init(p), p)[1] for n, (t, p) in cases.items()}
  )()
  fresh = jax.jit(lambda: {n: t.init(p) for n, (t, p) in cases.items()})()
  checkpointing.save(tmp_path, 1, {"codes": codes, "opt_states": updated})
  restored = checkpointing.restore(
    tmp_path, {"codes": codes, "opt_states": fresh}
  )
  assert jax.tree.structure(restored["opt_states"]) == jax.tree.structure(
    updated
  )
  for name in cases:
    chex.assert_trees_all_equal(restored["opt_states"][name], updated[name])
    chex.assert_trees_all_equal_dtypes(
      restored["opt_states"][name], updated[name]
    )
  assert restored["codes"]["w"].dtype == jnp.int8
  assert restored["opt_states"]["lns_madam_bf16"][0].rms_hat["w"].dtype == (
    jnp.bfloat16
  )


def test_raw_key_data_of_earlier_checkpoints_restores_as_typed_keys(tmp_path):
  """Earlier versions saved typed PRNG keys as their raw data; Orbax now
  stores typed keys itself. An old step still resumes with typed keys."""
  key = jax.random.key(5)
  checkpointing.save(tmp_path, 1, {"key": jax.random.key_data(key), "n": 1})
  restored = checkpointing.restore(tmp_path, {"key": jax.random.key(0), "n": 0})
  assert restored["key"].dtype == key.dtype and restored["n"] == 1
  chex.assert_trees_all_equal(_raw(restored["key"]), _raw(key))


def test_mismatched_optimizer_is_a_clear_error(tmp_path):
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  saved = {"params": params, "opt_state": madam_optax.madam().init(params)}
  checkpointing.save(tmp_path, 1, saved)
  target = {"params": params, "opt_state": optax.adam(1e-3).init(params)}
  with pytest.raises(
    ValueError,
    match=r"written with another model or optimizer \(.*opt_state\.0\.mu\.b: "
    r"checkpoint \(not set\), this run float32\[3\]",
  ):
    checkpointing.maybe_restore(tmp_path, target)


def test_mismatched_width_and_dtype_are_clear_errors(tmp_path):
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  tx = madam_optax.with_additive_fallback(params, madam_optax.madam())
  checkpointing.save(
    tmp_path, 1, {"params": params, "opt_state": tx.init(params)}
  )
  wide = {"w": jnp.ones((4, 5)), "b": jnp.zeros(5)}
  tx_wide = madam_optax.with_additive_fallback(wide, madam_optax.madam())
  with pytest.raises(
    ValueError,
    match=r"step 1 .* another model or optimizer \(\S+\.b: checkpoint "
    r"float32\[3\], this run float32\[5\]; .*; 2 more\)",
  ):
    checkpointing.restore(
      tmp_path, {"params": wide, "opt_state": tx_wide.init(wide)}
    )
  codes, _ = madam_optax.lns_encode_tree(params, FMT)
  with pytest.raises(
    ValueError,
    match=r"params\.w: checkpoint float32\[4, 3\], this run int8\[4, 3\]",
  ):
    checkpointing.restore(
      tmp_path, {"params": codes, "opt_state": tx.init(params)}
    )
  with pytest.raises(
    ValueError,
    match=r"extra: checkpoint \(not set\), this run int32\[\]",
  ):
    checkpointing.restore(
      tmp_path,
      {"params": params, "extra": jnp.int32(0), "opt_state": tx.init(params)},
    )
  with pytest.raises(
    ValueError,
    match=r"params\.b: checkpoint float32\[3\], this run \(not set\)",
  ):
    checkpointing.restore(
      tmp_path, {"params": {"w": params["w"]}, "opt_state": tx.init(params)}
    )


def test_restore_onto_mesh_from_abstract_state(tmp_path, eight_devices):
  """Saved from one device, restored sharded from ShapeDtypeStructs."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  mesh = _mesh(eight_devices)
  params = {"w": jax.random.normal(jax.random.key(0), (16, 4))}
  tx = madam_optax.madam()
  state = {
    "params": params,
    "opt_state": tx.init(params),
    "key": jax.random.key(3),
  }
  checkpointing.save(tmp_path, 4, state)
  shardings = jax.tree.map(lambda x: _sharding(x, mesh), state)
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(lambda: state),
    shardings,
  )
  assert isinstance(target["params"]["w"], jax.ShapeDtypeStruct)
  restored = checkpointing.restore(tmp_path, target)
  assert restored["params"]["w"].sharding == NamedSharding(mesh, P("x"))
  assert restored["key"].sharding == NamedSharding(mesh, P())
  chex.assert_trees_all_equal(_raw(restored), _raw(state))
  # And back: saved sharded over 8 devices, restored onto one.
  checkpointing.save(tmp_path, 5, restored)
  single = checkpointing.restore(tmp_path, state)
  assert single["params"]["w"].sharding == state["params"]["w"].sharding
  chex.assert_trees_all_equal(_raw(single), _raw(state))


def test_checkpointer_saves_every_n_and_keeps_the_newest(tmp_path):
  state = {"w": jnp.zeros(2)}
  with checkpointing.Checkpointer(tmp_path, every=2, max_to_keep=2) as ckpt:
    saved = [ckpt.maybe_save(s, {"w": state["w"] + s}) for s in range(1, 6)]
    assert ckpt.maybe_save(5, {"w": state["w"] + 5}, force=True) is True
    assert ckpt.maybe_save(5, state, force=True) is False  # already saved
  assert saved == [False, True, False, True, False]
  assert checkpointing.all_steps(tmp_path) == [4, 5]
  with pytest.raises(ValueError, match="step 5 is already saved"):
    checkpointing.save(tmp_path, 5, state)
  with pytest.raises(ValueError, match="checkpoint-every must be >= 1"):
    checkpointing.Checkpointer(tmp_path, every=0)
  restored, step = checkpointing.maybe_restore(tmp_path, state)
  assert step == 5 and float(restored["w"][0]) == 5.0


# ---------------------------------------------------------------- damage


def _two_steps(directory, second_config=None):
  """Steps 1 and 2 of a small Madam state; step 2 possibly by another run."""
  params = {"w": jnp.arange(12.0).reshape(4, 3) + 1, "b": jnp.zeros(3)}
  state = {"params": params, "opt_state": madam_optax.madam().init(params)}
  config = {"optimizer": "madam", "learning_rate": 0.01}
  checkpointing.save(directory, 1, state, config=config)
  later = jax.tree.map(lambda x: x * 2, state)
  checkpointing.save(directory, 2, later, config=second_config or config)
  return state, later, config


def _array_files(step_dir):
  files = sorted(glob.glob(os.path.join(step_dir, "default", "d", "*")))
  assert files, os.listdir(os.path.join(step_dir, "default"))
  return files


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _garble(path):
  with open(path, "wb") as f:
    f.write(b"\x89\xff\x00 not json {")


DAMAGE = {
  "step metadata lost": lambda d: os.remove(
    os.path.join(d, "_CHECKPOINT_METADATA")
  ),
  "step metadata garbled": lambda d: _garble(
    os.path.join(d, "_CHECKPOINT_METADATA")
  ),
  "tree metadata garbled": lambda d: _garble(
    os.path.join(d, "default", "_METADATA")
  ),
  "tree metadata lost": lambda d: os.remove(
    os.path.join(d, "default", "_METADATA")
  ),
  "array file truncated": lambda d: [_truncate(f) for f in _array_files(d)],
  "array file deleted": lambda d: [os.remove(f) for f in _array_files(d)],
}


def _files(directory):
  """Every file under ``directory`` with its size: what a run must not move."""
  return {
    os.path.relpath(os.path.join(root, name), directory): os.path.getsize(
      os.path.join(root, name)
    )
    for root, _, names in os.walk(directory)
    for name in names
  }


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_step_is_named_and_the_previous_step_restored(
  tmp_path, capsys, damage
):
  """Each kind of damage to the latest step: restoring that step names it
  and the fix in one line (no raw TensorStore or decoding error), and a
  resume says so and restores the previous complete step, leaving every
  file where it was (nothing renamed, moved or deleted)."""
  state, _, config = _two_steps(tmp_path)
  DAMAGE[damage](str(tmp_path / "2"))
  before = _files(tmp_path)
  with pytest.raises(checkpointing.DamagedCheckpointError) as error:
    checkpointing.restore(tmp_path, state, 2, config=config)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"checkpoint step 2 in {tmp_path} is damaged (")
  assert f"Move or delete the folder {tmp_path / '2'}" in message
  restored, step = checkpointing.maybe_restore(tmp_path, state, config=config)
  assert step == 1
  chex.assert_trees_all_equal(restored, state)
  out = capsys.readouterr().out
  said = re.search(
    rf"Checkpoint step 2 in {re.escape(str(tmp_path))} is "
    r"damaged \((.*)\); its files are left as they are \(later saves pass "
    r"over step 2\), trying step 1\n",
    out,
  )
  assert said, out
  # The same kind of damage (a storage error's own text may vary by read).
  assert said[1].split(":")[0] == error.value.reason.split(":")[0]
  assert f"Resumed from step 1 in {tmp_path}" in out
  assert _files(tmp_path) == before
  # A save of that step number does not overwrite it; later steps are saved.
  with checkpointing.Checkpointer(tmp_path, every=1, config=config) as ckpt:
    assert not ckpt.maybe_save(2, state)
    assert ckpt.maybe_save(3, state)
  assert {k: v for k, v in _files(tmp_path).items() if k in before} == before
  chex.assert_trees_all_equal(
    checkpointing.restore(tmp_path, state, config=config), state
  )


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_resume_is_the_same_for_relative_absolute_and_linked_folders(
  tmp_path, monkeypatch, capsys, how
):
  """``--checkpoint-dir ckpt`` (relative, as in docs/distributed.md) used to
  report every step damaged ("Checkpoint path should be absolute") and
  rename the good steps to ``N.damaged``: each form now resumes the latest
  step and leaves every file where it was."""
  monkeypatch.chdir(tmp_path)
  os.mkdir("real")
  if how == "symlink":
    os.symlink("real", "link")
  folder = {
    "relative": "real",
    "absolute": str(tmp_path / "real"),
    "symlink": "link",
  }[how]
  state, later, config = _two_steps(folder)
  before = _files(tmp_path / "real")
  restored, step = checkpointing.maybe_restore(folder, state, config=config)
  assert step == 2, capsys.readouterr().out
  chex.assert_trees_all_equal(restored, later)
  assert "damaged" not in capsys.readouterr().out
  assert checkpointing.latest_step(folder) == 2
  with checkpointing.Checkpointer(folder, every=1, config=config) as ckpt:
    ckpt.maybe_save(3, later)
  assert checkpointing.all_steps(folder) == [1, 2, 3]
  assert sorted(os.listdir(tmp_path / "real")) == ["1", "2", "3"]
  assert {
    k: v for k, v in _files(tmp_path / "real").items() if k in before
  } == (before)


def test_lost_step_metadata_no_longer_skips_the_configuration_check(
  tmp_path, capsys
):
  """Step 2 was written by another optimizer configuration. Intact, it is
  refused by name; with its _CHECKPOINT_METADATA (which holds the config)
  lost, it used to be restored unchecked: now it is a damaged step, and the
  resume takes step 1, whose configuration matches."""
  other = {"optimizer": "madam", "learning_rate": 0.05}
  state, _, config = _two_steps(tmp_path, second_config=other)
  with pytest.raises(ValueError, match=r"learning_rate: checkpoint 0\.05"):
    checkpointing.maybe_restore(tmp_path, state, config=config)
  os.remove(tmp_path / "2" / "_CHECKPOINT_METADATA")
  restored, step = checkpointing.maybe_restore(tmp_path, state, config=config)
  assert step == 1
  chex.assert_trees_all_equal(restored, state)
  assert re.search(
    r"step 2 .* is damaged \(FileNotFoundError: .*_CHECKPOINT_METADATA",
    capsys.readouterr().out,
  )


def test_only_step_damaged_stops_with_one_line(tmp_path):
  params = {"w": jnp.ones((4, 3))}
  checkpointing.save(tmp_path, 3, params)
  _truncate(_array_files(str(tmp_path / "3"))[0])
  with pytest.raises(
    checkpointing.DamagedCheckpointError,
    match=r"^checkpoint step 3 .* is damaged \(\w+: .*\)\. Move or "
    r"delete the "
    r"folder .*3 \(a rerun then resumes from the "
    r"previous complete step, or from step 0 if "
    r"there is none\)",
  ):
    checkpointing.maybe_restore(tmp_path, params)
  assert checkpointing.all_steps(tmp_path) == [3]  # left where it was


def test_read_only_folder_fails_at_that_save(tmp_path):
  """Saves run in the background; without a check, the save into a folder
  that became read-only would fail one interval later."""
  state = {"w": jnp.ones(3)}
  checkpointing.save(tmp_path, 1, state)
  os.chmod(tmp_path, 0o555)
  try:
    try:  # A process with the right to ignore file modes (root) cannot
      (tmp_path / "probe").write_text("x")  # test this.
      os.remove(tmp_path / "probe")
      pytest.skip("this process may write into read-only folders (root)")
    except PermissionError:
      pass
    message = (
      rf"^cannot save checkpoint step 2 in {tmp_path}: Permission "
      r"denied\. Make the folder writable"
    )
    with checkpointing.Checkpointer(tmp_path, every=1) as ckpt:
      with pytest.raises(checkpointing.CheckpointWriteError, match=message):
        ckpt.maybe_save(2, state)
    with pytest.raises(checkpointing.CheckpointWriteError, match=message):
      checkpointing.save(tmp_path, 2, state)
    assert checkpointing.all_steps(tmp_path) == [1]
  finally:
    os.chmod(tmp_path, 0o755)


if __name__ == "__main__":
  worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
