"""Training runs: a task's optimizers, a ``vmap``-able run, and ``train``.

A :class:`Task` bundles a Flax NNX model (or two, for the GAN), its data,
losses and evaluation; :mod:`madam_examples.tasks` builds them. Every run
trains through :func:`madam_examples.step.train_step`, on float weights or,
with ``lns_format``, on integer LNS codes (optimizer ``"lns_madam"``)::

  task = tasks.build_task("mlp")
  state, history = train(task, "madam", 0.01, steps=500)
  fmt = madam_optax.LNSFormat.spanning(127)          # int8 codes
  state, history = train(task, "lns_madam", 0.01, lns_format=fmt)

Reference: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from madam_examples import optimizers as optimizers_lib
from madam_examples import step as step_lib
from madam_examples.step import Loss
from madam_examples.step import Params
from madam_examples.step import TrainState
import madam_optax

# A name from ``optimizers`` or a factory ``(learning_rate, params) -> tx``.
Optimizer = str | Callable[[Any, Any], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity
class Task:
  """A model (or models), its data, losses and evaluation.

  Attributes:
    name, description: e.g. ``"cnn"``, and one line for tables and plots.
    metric: the evaluation's headline (``"accuracy"`` in %, ``"perplexity"``).
    higher_is_better: the metric's direction.
    p_scale: Madam's ``p_scale`` for this family (paper: 3 for image nets and
      the GAN, 2 for the Transformer); also the LNS codes' scale.
    steps, eval_every: the default run length and evaluation interval.
    graphdefs: component name -> ``nnx.GraphDef``.
    init: key -> component name -> parameters.
    losses: component name -> ``loss(weights, data, key) -> scalar``, where
      ``weights`` holds every component's float weights; one step of each
      component per train step, in this order, the others held fixed.
    evaluate: ``(weights, data) -> {metric: value, ...}``, jittable.
    data: the arrays the losses and the evaluation read.
  """

  name: str
  description: str
  metric: str
  higher_is_better: bool
  p_scale: float
  steps: int
  eval_every: int
  graphdefs: Mapping[str, Any]
  init: Callable[[jax.Array], Params]
  losses: Mapping[str, Loss]
  evaluate: Callable[[Params, Any], dict[str, jax.Array]]
  data: Any


@functools.cache
def reference_params(task: Task) -> Params:
  """Concrete parameters from seed 0, for labelling leaves (cached per task).

  Which leaves are zero at initialisation does not depend on the seed, so the
  labels from these serve every seed, including inside ``jit``/``vmap``.
  """
  with jax.ensure_compile_time_eval():  # concrete even inside a trace
    return jax.device_get(task.init(jax.random.key(0)))


def init_task_state(
  task: Task,
  txs: Mapping[str, optax.GradientTransformation],
  key: jax.Array,
  *,
  lns_format: madam_optax.LNSFormat | None = None,
) -> TrainState:
  """Fresh parameters (encoded with ``lns_format``) and optimizer states."""
  init_key, train_key = jax.random.split(key)
  params, max_magnitudes = task.init(init_key), None
  if lns_format is not None:
    params, max_magnitudes = step_lib.encode_lns(
      params, reference_params(task), lns_format, p_scale=task.p_scale
    )
  return step_lib.init_state(params, txs, train_key, max_magnitudes)


def task_optimizers(
  task: Task, optimizer: Optimizer, learning_rate: Any, **options: Any
) -> dict[str, optax.GradientTransformation]:
  """One optimizer per component of ``task``, by name or factory
  (:func:`madam_examples.optimizers.make_optimizers`, the task's
  ``p_scale``)."""
  return optimizers_lib.make_optimizers(
    reference_params(task),
    optimizer,
    learning_rate,
    p_scale=task.p_scale,
    **options,
  )


def make_run_fn(
  task: Task,
  optimizer: Optimizer,
  steps: int,
  eval_every: int,
  *,
  schedule: str = "cosine",
  lns_format: madam_optax.LNSFormat | None = None,
  **options: Any,
) -> Callable[[jax.Array, jax.Array, Any], dict]:
  """A pure ``run(key, learning_rate, data) -> history`` for ``jax.vmap``.

  The history holds, for each of the ``steps // eval_every`` evaluations, the
  mean training losses since the last one and the evaluation metrics. With
  ``lns_format`` the model trains as LNS codes (LNS-Madam's rounding seed is
  drawn from ``key``). Eight seeds in one program::

    run = make_run_fn(task, "madam", 800, 800)
    keys = jax.random.split(jax.random.key(0), 8)
    history = jax.jit(jax.vmap(run, (0, None, None)))(keys, 0.01, task.data)
  """
  num_evals = max(steps // eval_every, 1)
  eval_every = steps // num_evals
  options.update(schedule=schedule, steps=steps, lns_format=lns_format)

  def run(key, learning_rate, data):
    seed = jax.random.randint(jax.random.fold_in(key, 1), (), 0, 2**31 - 1)
    txs = task_optimizers(task, optimizer, learning_rate, seed=seed, **options)
    state = init_task_state(task, txs, key, lns_format=lns_format)

    def chunk(s, _):
      s, sums = step_lib.train_chunk(
        task.losses, txs, s, data, eval_every, lns_format=lns_format
      )
      metrics = task.evaluate(step_lib.weights(s, lns_format), data)
      return s, {**jax.tree.map(lambda x: x / eval_every, sums), **metrics}

    _, history = jax.lax.scan(chunk, state, None, length=num_evals)
    return history

  return run


def _load_history(checkpoint_dir: str | None, start: int) -> dict[str, list]:
  """The evaluations up to ``start`` saved beside the checkpoints."""
  if checkpoint_dir is None or start == 0:
    return {"step": []}
  try:
    path = os.path.join(checkpoint_dir, "history.json")
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return {"step": []}
  keep = [i for i, s in enumerate(saved.get("step", [])) if s <= start]
  return {k: [v[i] for i in keep] for k, v in saved.items()}


def _save_history(checkpoint_dir: str, history: dict[str, list]) -> None:
  path = os.path.join(checkpoint_dir, "history.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(history, f)
  os.replace(path + ".tmp", path)


def _checkpoint_tree(
  state: TrainState, loss_sums: dict[str, Any], steps_since_eval: Any
) -> dict[str, Any]:
  """What a checkpoint of :func:`train` holds: the state, and the training
  losses summed over the steps since the last evaluation."""
  return {
    "train_state": state,
    "loss_sums": loss_sums,
    "steps_since_eval": jnp.asarray(steps_since_eval, jnp.int32),
  }


def _run_config(
  task: Task,
  optimizer: Optimizer,
  learning_rate: float,
  seed: int,
  steps: int,
  schedule: str,
  lns_format: madam_optax.LNSFormat | None,
  options: Mapping[str, Any],
) -> dict[str, Any]:
  """The settings saved with every checkpoint and compared on resume."""
  name = getattr(optimizer, "__name__", optimizer)
  config = dict(task=task.name, optimizer=name, schedule=schedule)
  config.update(
    learning_rate=float(learning_rate), seed=int(seed), steps=int(steps)
  )
  if lns_format is not None:
    levels, base = int(lns_format.levels), float(lns_format.base)
    config["lns_format"] = {"levels": levels, "base": base}
  if options:
    config["options"] = {k: str(v) for k, v in sorted(options.items())}
  return config


def train(
  task: Task,
  optimizer: Optimizer,
  learning_rate: float,
  *,
  seed: int = 0,
  steps: int | None = None,
  eval_every: int | None = None,
  schedule: str = "cosine",
  lns_format: madam_optax.LNSFormat | None = None,
  optimizer_options: Mapping[str, Any] | None = None,
  callback: Callable[[int, dict, TrainState], None] | None = None,
  checkpoint_dir: str | None = None,
  checkpoint_every: int = 100,
) -> tuple[TrainState, dict[str, np.ndarray]]:
  """Trains ``task`` with one optimizer; a Python loop over jitted chunks.

  With ``checkpoint_dir``, the :class:`~madam_examples.step.TrainState` and
  the training losses summed since the last evaluation are saved every
  ``checkpoint_every`` steps and at the end (:mod:`.checkpointing`), with
  the evaluation history beside them (``history.json``); a later call with
  the same folder resumes from the latest complete checkpoint and continues
  bit for bit. The run's settings are saved too: a resume with another
  schedule, length, rate or LNS format is refused with a clear error.

  Args:
    task: e.g. from :func:`madam_examples.tasks.build_task`.
    optimizer: ``"madam"``, ``"adam"``, ``"sgd"``, ``"lns_madam"`` (with
      ``lns_format``), or a factory ``(learning_rate, params) -> tx``.
    learning_rate, schedule: the peak rate; ``"cosine"`` (decay to 0 over
      ``steps``) or ``"constant"``.
    seed: initialisation, batch-sampling and stochastic-rounding seed.
    steps, eval_every: default ``task.steps`` and ``task.eval_every``.
    lns_format: train the leaves Madam can move as LNS codes of this format.
    optimizer_options: further keywords of
      :func:`madam_examples.optimizers.make_optimizer`.
    callback: called with (steps done, metrics, state) after each
      evaluation, and with (start step, {}, state) before training.
    checkpoint_dir, checkpoint_every: this run's checkpoint folder (or
      ``None``) and the steps between checkpoints.

  Returns:
    The final state and the history: ``{"step": ..., name: values}``, one
    entry per evaluation, and three scalars: ``"resumed_from"`` (0 on a
    fresh start), ``"compile_seconds"`` and ``"train_seconds"`` (the steps,
    evaluations and checkpoints, compilation excluded).
  """
  steps = task.steps if steps is None else steps
  eval_every = min(task.eval_every if eval_every is None else eval_every, steps)
  options = dict(optimizer_options or {})
  settings = dict(schedule=schedule, steps=steps, lns_format=lns_format)
  txs = task_optimizers(
    task, optimizer, learning_rate, seed=seed, **settings, **options
  )
  compile_start = time.perf_counter()
  state = jax.jit(
    lambda k: init_task_state(task, txs, k, lns_format=lns_format)
  )(jax.random.key(seed))
  compile_seconds = time.perf_counter() - compile_start
  # The training losses summed since the last evaluation: checkpointed with
  # the state, so that a run resumed between two evaluations reports the
  # same mean training loss as an uninterrupted one.
  sums = {f"{c}_loss": jnp.zeros((), jnp.float32) for c in task.losses}
  since_eval = jnp.zeros((), jnp.int32)
  start, ckpt = 0, None
  if checkpoint_dir is not None:
    # Orbax is imported by runs that checkpoint, only.
    from madam_examples import checkpointing  # pylint: disable=import-outside-toplevel

    config = _run_config(
      task, optimizer, learning_rate, seed, steps, schedule, lns_format, options
    )
    saved, start = checkpointing.maybe_restore(
      checkpoint_dir,
      _checkpoint_tree(state, sums, since_eval),
      verbose=False,
      config=config,
    )
    state, sums, since_eval = (
      saved["train_state"],
      saved["loss_sums"],
      saved["steps_since_eval"],
    )
    start = min(int(start), steps)
    ckpt = checkpointing.Checkpointer(
      checkpoint_dir, checkpoint_every, config=config
    )
  history = _load_history(checkpoint_dir, start)
  if start < steps:
    compile_start = time.perf_counter()  # compiled ahead of the loop
    chunk = functools.partial(
      step_lib.train_chunk, task.losses, txs, lns_format=lns_format
    )
    chunk = jax.jit(chunk).lower(state, task.data, jnp.int32(1)).compile()
    evaluate = jax.jit(
      lambda s, d: task.evaluate(step_lib.weights(s, lns_format), d)
    )
    evaluate = evaluate.lower(state, task.data).compile()
    compile_seconds += time.perf_counter() - compile_start
  if callback is not None:
    callback(start, {}, state)
  done, since_eval = start, int(since_eval)
  train_start = time.perf_counter()
  try:
    while done < steps:
      n = min(eval_every - done % eval_every, steps - done)
      if ckpt is not None:
        n = min(n, checkpoint_every - done % checkpoint_every)
      state, chunk_sums = chunk(state, task.data, jnp.int32(n))
      sums = jax.tree.map(jnp.add, sums, chunk_sums)
      done += n
      since_eval += n
      if done % eval_every == 0 or done == steps:
        metrics = {k: v / since_eval for k, v in sums.items()}
        metrics.update(evaluate(state, task.data))
        metrics = {k: float(v) for k, v in metrics.items()}
        history["step"].append(done)
        for k, v in metrics.items():
          history.setdefault(k, []).append(v)
        sums = jax.tree.map(jnp.zeros_like, sums)
        since_eval = 0
        if callback is not None:
          callback(done, metrics, state)
      if ckpt is not None and ckpt.maybe_save(
        done, _checkpoint_tree(state, sums, since_eval), force=done == steps
      ):
        _save_history(checkpoint_dir, history)
  finally:
    if ckpt is not None:
      ckpt.close()
  train_seconds = time.perf_counter() - train_start
  out = {k: np.asarray(v) for k, v in history.items()}
  out["resumed_from"] = np.asarray(start)
  out["compile_seconds"] = np.asarray(compile_seconds)
  out["train_seconds"] = np.asarray(train_seconds)
  return state, out
