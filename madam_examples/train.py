"""Reusable tasks, optimizers and training loops for the examples.

A :class:`Task` bundles a Flax NNX model (or two, for the GAN), its data (as
arrays, passed explicitly to jitted functions), its losses and its evaluation
metric. Training is functional: the models are split once with ``nnx.split``
into a static ``graphdef`` and a pytree of parameters, and the jitted step
``nnx.merge``s them back. That keeps everything a plain pytree, so the same
step runs one model (the demo), a batch of seeds and learning rates under
``jax.vmap`` (the learning-rate study), or under a sharding or a checkpointer.

Typical use::

  task = build_task("mlp")
  state, history = train(task, "madam", 0.01, seed=0, steps=500)

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import madam_optax
from madam_examples import data as data_lib
from madam_examples import gan_metric
from madam_examples import models

TASKS = ("mlp", "cnn", "transformer", "gan")
OPTIMIZERS = ("madam", "adam", "sgd")
SCHEDULES = ("cosine", "constant")
# The usual defaults: Madam's paper default, Adam's 1e-3, SGD's 0.1 (momentum 0.9).
DEFAULT_LEARNING_RATES = {"madam": 0.01, "adam": 1e-3, "sgd": 0.1}
# The additive optimizer for the leaves Madam cannot move (zero-initialised
# biases and norm offsets): Adam at its default, whatever Madam's learning rate.
ADDITIVE_FALLBACK_LR = 1e-3

Params = dict[str, Any]   # component name -> nnx parameter state


@dataclasses.dataclass(frozen=True)
class Task:
  """A model (or models), its data, losses and evaluation.

  Attributes:
    name: e.g. ``"cnn"``.
    description: one line for tables and plots.
    metric: the evaluation metric's name (``"accuracy"`` in %,
      ``"perplexity"``, ``"frechet_distance"``).
    higher_is_better: the metric's direction.
    p_scale: Madam's ``p_scale`` for this family (paper: 3 for image nets and
      the GAN, 2 for the Transformer).
    steps: default number of training steps.
    eval_every: steps between evaluations.
    graphdefs: component name -> ``nnx.GraphDef``.
    init: key -> component name -> parameters (an ``nnx.State``).
    losses: component name -> ``loss(params, data, key) -> scalar``; the
      components are updated in this order, each against its own loss with the
      others' latest parameters held fixed (one step of each per train step).
    evaluate: ``(params, data) -> {metric: value, ...}``, jittable.
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
  losses: Mapping[str, Callable[[Params, Any, jax.Array], jax.Array]]
  evaluate: Callable[[Params, Any], dict[str, jax.Array]]
  data: Any


class TrainState(NamedTuple):
  """Everything that changes during training; a plain pytree (checkpointable)."""
  params: Params
  opt_state: dict[str, Any]
  key: jax.Array
  step: jax.Array


# ----------------------------------------------------------------- optimizers


def learning_rate_schedule(learning_rate: Any, schedule: str,
                           steps: int) -> Any:
  """``learning_rate`` held constant, or cosine-decayed to 0 over ``steps``.

  The same shape serves every optimizer, so a sweep compares peak rates.
  """
  if schedule == "constant":
    return learning_rate
  if schedule == "cosine":
    return optax.cosine_decay_schedule(learning_rate, max(int(steps), 1))
  raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}.")


def make_optimizer(name: str, learning_rate: Any, params: Any, *,
                   p_scale: float = 3.0) -> optax.GradientTransformation:
  """Madam, Adam or SGD with momentum 0.9, for ``params``' structure.

  Madam follows the core library's recipe for the leaves it cannot move:
  ``madam_optax.with_additive_fallback`` labels the all-zero leaves at
  initialisation (Flax's biases, LayerNorm/GroupNorm offsets) and hands them
  to Adam(``ADDITIVE_FALLBACK_LR``); every other leaf is Madam's.

  Args:
    name: ``"madam"``, ``"adam"`` or ``"sgd"``.
    learning_rate: a float, a traced scalar (the study vmaps over it) or an
      optax schedule.
    params: concrete initial parameters; Madam uses them to find the leaves it
      cannot move (all-zero at init).
    p_scale: Madam's weight bound as a multiple of each tensor's initial RMS.

  Returns:
    An ``optax.GradientTransformation``.
  """
  if name == "madam":
    # The zero-leaf recipe: Madam multiplies weights, so the zero-initialised
    # leaves (Flax's biases and norm offsets) would never move; they go to Adam.
    return madam_optax.with_additive_fallback(
        params,
        madam_optax.madam(learning_rate, p_scale=p_scale),
        optax.adam(ADDITIVE_FALLBACK_LR))
  if name == "adam":
    return optax.adam(learning_rate)
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=0.9)
  raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def make_optimizers(task: Task, name: str, learning_rate: Any, *,
                    schedule: str = "constant", steps: int = 1
                    ) -> dict[str, optax.GradientTransformation]:
  """One optimizer per component of ``task`` (same kind, same learning rate).

  ``schedule``/``steps``: see :func:`learning_rate_schedule`.
  """
  reference = reference_params(task)
  lr = learning_rate_schedule(learning_rate, schedule, steps)
  return {c: make_optimizer(name, lr, reference[c], p_scale=task.p_scale)
          for c in task.losses}


_REFERENCE_CACHE: dict[int, tuple[Task, Params]] = {}


def reference_params(task: Task) -> Params:
  """Concrete parameters from seed 0, for labelling leaves (cached per task).

  Which leaves are zero at initialisation does not depend on the seed, so the
  labels from these serve every seed, including inside ``jit``/``vmap``.
  """
  key = id(task)
  if key not in _REFERENCE_CACHE:
    with jax.ensure_compile_time_eval():   # concrete even inside a trace
      params = jax.device_get(task.init(jax.random.key(0)))
    _REFERENCE_CACHE[key] = (task, params)
  return _REFERENCE_CACHE[key][1]


# ----------------------------------------------------------------- training


def init_state(task: Task, txs: Mapping[str, optax.GradientTransformation],
               key: jax.Array) -> TrainState:
  """Fresh parameters and optimizer states from ``key`` (jittable)."""
  init_key, train_key = jax.random.split(key)
  params = task.init(init_key)
  opt_state = {c: txs[c].init(params[c]) for c in task.losses}
  return TrainState(params, opt_state, train_key, jnp.zeros((), jnp.int32))


def train_step(task: Task, txs: Mapping[str, optax.GradientTransformation],
               state: TrainState, data: Any) -> tuple[TrainState, dict]:
  """One update of every component; returns the new state and the losses."""
  key, *keys = jax.random.split(state.key, len(task.losses) + 1)
  params = dict(state.params)
  opt_state = dict(state.opt_state)
  metrics = {}
  for (component, loss_fn), k in zip(task.losses.items(), keys):
    def loss_of_component(p, component=component, loss_fn=loss_fn, k=k):
      return loss_fn({**params, component: p}, data, k)
    loss, grads = jax.value_and_grad(loss_of_component)(params[component])
    updates, opt_state[component] = txs[component].update(
        grads, opt_state[component], params[component])
    params[component] = optax.apply_updates(params[component], updates)
    metrics[f"{component}_loss"] = loss
  return TrainState(params, opt_state, key, state.step + 1), metrics


def train_chunk(task: Task, txs: Mapping[str, optax.GradientTransformation],
                state: TrainState, data: Any, num_steps: Any
                ) -> tuple[TrainState, dict]:
  """``num_steps`` train steps in a loop; returns the summed losses.

  ``num_steps`` may be traced (a ``fori_loop`` bound), so one compiled chunk
  serves every chunk length (evaluation and checkpoint intervals).
  """
  zeros = {f"{c}_loss": jnp.zeros((), jnp.float32) for c in task.losses}

  def body(_, carry):
    s, sums = carry
    s, losses = train_step(task, txs, s, data)
    return s, jax.tree.map(lambda a, b: a + b.astype(jnp.float32), sums, losses)
  return jax.lax.fori_loop(0, num_steps, body, (state, zeros))


def make_run_fn(task: Task, optimizer: str, steps: int, eval_every: int, *,
                schedule: str = "cosine"
                ) -> Callable[[jax.Array, jax.Array, Any], dict]:
  """A pure ``run(key, learning_rate, data) -> history`` for ``jax.vmap``.

  The history holds, for each of the ``steps // eval_every`` evaluations, the
  mean training losses since the last one and the evaluation metrics.
  """
  num_evals = max(steps // eval_every, 1)
  eval_every = steps // num_evals

  def run(key, learning_rate, data):
    txs = make_optimizers(task, optimizer, learning_rate, schedule=schedule,
                          steps=steps)
    state = init_state(task, txs, key)

    def chunk(s, _):
      s, sums = train_chunk(task, txs, s, data, eval_every)
      losses = jax.tree.map(lambda x: x / eval_every, sums)
      return s, {**losses, **task.evaluate(s.params, data)}
    _, history = jax.lax.scan(chunk, state, None, length=num_evals)
    return history
  return run


def _history_path(checkpoint_dir: str) -> str:
  return os.path.join(os.fspath(checkpoint_dir), "history.json")


def _load_history(checkpoint_dir: str | None, start: int) -> dict[str, list]:
  """The evaluations up to ``start`` saved beside the checkpoints, if any."""
  if checkpoint_dir is None or start == 0:
    return {"step": []}
  try:
    with open(_history_path(checkpoint_dir), encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return {"step": []}
  keep = [i for i, s in enumerate(saved.get("step", [])) if s <= start]
  return {k: [v[i] for i in keep] for k, v in saved.items()}


def _import_checkpointing():
  try:
    from madam_examples import checkpointing  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise RuntimeError(
        "checkpointing needs madam_examples.checkpointing (Orbax); it could "
        f"not be imported ({e}). Install the examples extra: "
        "pip install 'madam-optax[examples]'.") from e
  return checkpointing


def train(task: Task, optimizer: str, learning_rate: float, *, seed: int = 0,
          steps: int | None = None, eval_every: int | None = None,
          schedule: str = "cosine",
          callback: Callable[[int, dict], None] | None = None,
          checkpoint_dir: str | None = None, checkpoint_every: int = 100,
          ) -> tuple[TrainState, dict[str, np.ndarray]]:
  """Trains ``task`` with one optimizer; a Python loop over jitted chunks.

  With ``checkpoint_dir``, the :class:`TrainState` (a plain pytree: params,
  optimizer states, PRNG key, step) is saved every ``checkpoint_every`` steps
  and at the end with :mod:`madam_examples.checkpointing` (Orbax, atomic),
  together with the evaluation history (``history.json`` in the same
  folder); a later call with the same folder resumes from the latest complete
  checkpoint and continues bit for bit (same ``steps`` and ``schedule``).

  Args:
    task: from :func:`build_task`.
    optimizer: ``"madam"``, ``"adam"`` or ``"sgd"``.
    learning_rate: the (peak) learning rate.
    seed: initialisation and batch-sampling seed.
    steps: training steps (default ``task.steps``).
    eval_every: steps between evaluations (default ``task.eval_every``).
    schedule: ``"cosine"`` (decay to 0 over ``steps``) or ``"constant"``.
    callback: called after each evaluation with (steps done, metrics), and
      once with (start step, {}) before training (e.g. a progress bar).
    checkpoint_dir: the folder for this run's checkpoints, or ``None``.
    checkpoint_every: steps between checkpoints.

  Returns:
    The final :class:`TrainState` and the history: ``{"step": ..., name:
    values}`` with one entry per evaluation, plus ``"resumed_from"`` (the
    step training resumed from, 0 on a fresh start).
  """
  steps = task.steps if steps is None else steps
  eval_every = min(task.eval_every if eval_every is None else eval_every, steps)
  txs = make_optimizers(task, optimizer, learning_rate, schedule=schedule,
                        steps=steps)
  state = jax.jit(lambda k: init_state(task, txs, k))(jax.random.key(seed))
  chunk = jax.jit(lambda s, d, n: train_chunk(task, txs, s, d, n))
  evaluate = jax.jit(task.evaluate)
  start, ckpt = 0, None
  if checkpoint_dir is not None:
    checkpointing = _import_checkpointing()
    # Saved with every step and compared on resume: a rerun with another
    # schedule, length or rate fails clearly instead of silently mixing them.
    config = {"task": task.name, "optimizer": optimizer,
              "learning_rate": float(learning_rate), "seed": int(seed),
              "steps": int(steps), "schedule": schedule}
    state, start = checkpointing.maybe_restore(checkpoint_dir, state,
                                               verbose=False, config=config)
    start = min(int(start), steps)
    ckpt = checkpointing.Checkpointer(checkpoint_dir, checkpoint_every,
                                      config=config)
  history = _load_history(checkpoint_dir, start)
  if callback is not None:
    callback(start, {})
  done, since_eval = start, 0
  sums = None
  try:
    while done < steps:
      n = min(eval_every - done % eval_every, steps - done)
      if ckpt is not None:
        n = min(n, checkpoint_every - done % checkpoint_every)
      state, chunk_sums = chunk(state, task.data, jnp.int32(n))
      sums = chunk_sums if sums is None else jax.tree.map(
          jnp.add, sums, chunk_sums)
      done += n
      since_eval += n
      if done % eval_every == 0 or done == steps:
        metrics = {k: v / since_eval for k, v in sums.items()}
        metrics.update(evaluate(state.params, task.data))
        metrics = {k: float(v) for k, v in metrics.items()}
        history["step"].append(done)
        for k, v in metrics.items():
          history.setdefault(k, []).append(v)
        sums, since_eval = None, 0
        if callback is not None:
          callback(done, metrics)
      if ckpt is not None and ckpt.maybe_save(done, state,
                                              force=done == steps):
        with open(_history_path(checkpoint_dir) + ".tmp", "w",
                  encoding="utf-8") as f:
          json.dump(history, f)
        os.replace(_history_path(checkpoint_dir) + ".tmp",
                   _history_path(checkpoint_dir))
  finally:
    if ckpt is not None:
      ckpt.close()
  out = {k: np.asarray(v) for k, v in history.items()}
  out["resumed_from"] = np.asarray(start)
  return state, out


# ----------------------------------------------------------------- tasks


def _init_fn(make: Callable[[nnx.Rngs], nnx.Module]) -> tuple[Any, Callable]:
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))

  def init(key):
    return nnx.split(make(nnx.Rngs(key)))[1]
  return graphdef, init


def _batched(fn: Callable[[jax.Array], jax.Array], x: jax.Array,
             chunk: int = 500) -> jax.Array:
  """``fn`` over ``x`` in chunks (``lax.map``) to bound memory."""
  n = x.shape[0]
  if n <= chunk:
    return fn(x)
  n = n - n % chunk
  out = jax.lax.map(fn, x[:n].reshape(n // chunk, chunk, *x.shape[1:]))
  return out.reshape(n, *out.shape[2:])


def _classification_task(name: str, description: str, images: data_lib.ImageData,
                         make: Callable[[nnx.Rngs], nnx.Module], *,
                         batch_size: int, steps: int, eval_every: int,
                         max_eval: int = 2000) -> Task:
  graphdef, init_model = _init_fn(make)
  data = {"x": jnp.asarray(images.x_train), "y": jnp.asarray(images.y_train),
          "x_test": jnp.asarray(images.x_test[:max_eval]),
          "y_test": jnp.asarray(images.y_test[:max_eval])}

  def loss(params, data, key):
    idx = jax.random.randint(key, (batch_size,), 0, data["x"].shape[0])
    logits = nnx.merge(graphdef, params["model"])(data["x"][idx])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, data["y"][idx]).mean()

  def evaluate(params, data):
    model = nnx.merge(graphdef, params["model"])
    logits = _batched(model, data["x_test"])
    y = data["y_test"][:logits.shape[0]]
    return {
        "accuracy": 100.0 * jnp.mean(jnp.argmax(logits, -1) == y),
        "test_loss": optax.softmax_cross_entropy_with_integer_labels(
            logits, y).mean()}

  return Task(name, description, "accuracy", True, 3.0, steps, eval_every,
              {"model": graphdef}, lambda k: {"model": init_model(k)},
              {"model": loss}, evaluate, data)


def _windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
  count = min(count, len(tokens) // length)
  return tokens[:count * length].reshape(count, length)


def _language_model_task(text: data_lib.TextData, *, context: int, dim: int,
                         depth: int, batch_size: int, steps: int,
                         eval_every: int, eval_windows: int = 256) -> Task:
  vocab = len(text.vocab)
  graphdef, init_model = _init_fn(
      lambda r: models.CharTransformer(vocab, context, dim, depth, 4, rngs=r))
  if len(text.train) <= context + 1 or len(text.valid) < context + 1:
    raise ValueError(
        f"the text is too short for context {context}: give at least "
        f"{10 * (context + 1)} characters.")
  data = {"tokens": jnp.asarray(text.train),
          "valid": jnp.asarray(_windows(text.valid, context + 1, eval_windows))}

  def next_char_loss(model, windows):
    logits = model(windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, windows[:, 1:]).mean()

  def loss(params, data, key):
    starts = jax.random.randint(key, (batch_size,), 0,
                                data["tokens"].shape[0] - context - 1)
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice(
        data["tokens"], (s,), (context + 1,)))(starts)
    return next_char_loss(nnx.merge(graphdef, params["model"]), windows)

  def evaluate(params, data):
    nll = next_char_loss(nnx.merge(graphdef, params["model"]), data["valid"])
    return {"perplexity": jnp.exp(nll), "test_loss": nll}

  return Task("transformer",
              f"Transformer char LM ({depth} layers, d={dim}, context "
              f"{context})",
              "perplexity", False, 2.0, steps, eval_every, {"model": graphdef},
              lambda k: {"model": init_model(k)}, {"model": loss}, evaluate,
              data)


def _gan_task(*, latent: int, batch_size: int, steps: int, eval_every: int,
              eval_samples: int = 1000) -> Task:
  digits = data_lib.load_digits()
  shape = digits.x_train.shape[1:]
  g_def, g_init = _init_fn(lambda r: models.Generator(latent, shape, rngs=r))
  d_def, d_init = _init_fn(
      lambda r: models.Discriminator(int(np.prod(shape)), rngs=r))
  ref = gan_metric.digits_reference()
  data = {"real": jnp.asarray(digits.x_train * 2 - 1),
          "z_eval": jax.random.normal(jax.random.key(1234),
                                      (eval_samples, latent)),
          "fd": {"params": ref.params, "mean": jnp.asarray(ref.real_mean),
                 "cov_sqrt": jnp.asarray(ref.real_cov_sqrt),
                 "cov_trace": jnp.asarray(ref.real_cov_trace)}}

  def fake(params, key):
    z = jax.random.normal(key, (batch_size, latent))
    return nnx.merge(g_def, params["generator"])(z)

  # Non-saturating GAN losses (Goodfellow et al. 2014).
  def d_loss(params, data, key):
    k_real, k_fake = jax.random.split(key)
    idx = jax.random.randint(k_real, (batch_size,), 0, data["real"].shape[0])
    disc = nnx.merge(d_def, params["discriminator"])
    fakes = jax.lax.stop_gradient(fake(params, k_fake))
    return (jax.nn.softplus(-disc(data["real"][idx])).mean()
            + jax.nn.softplus(disc(fakes)).mean())

  def g_loss(params, data, key):
    disc = nnx.merge(d_def, params["discriminator"])
    return jax.nn.softplus(-disc(fake(params, key))).mean()

  def evaluate(params, data):
    images = nnx.merge(g_def, params["generator"])(data["z_eval"])
    fd = data["fd"]
    mean, cov = gan_metric.mean_and_cov(
        gan_metric.features(ref.graphdef, fd["params"], images))
    return {"frechet_distance": gan_metric.frechet_distance(
        mean, cov, fd["mean"], fd["cov_sqrt"], fd["cov_trace"])}

  def init(key):
    kg, kd = jax.random.split(key)
    return {"discriminator": d_init(kd), "generator": g_init(kg)}

  return Task("gan", "MLP GAN on digits (Frechet distance, classifier features)",
              "frechet_distance", False, 3.0, steps, eval_every,
              {"discriminator": d_def, "generator": g_def}, init,
              {"discriminator": d_loss, "generator": g_loss}, evaluate, data)


def build_task(name: str, *, data_path: str | None = None,
               quick: bool = False) -> Task:
  """Builds one of ``TASKS`` on offline data (or the user's data).

  The models are small on purpose: the demo and the learning-rate study run
  on a 2-core CPU in minutes. Point ``data_path`` at bigger data (and raise
  ``steps``) for more.

  Args:
    name: ``"mlp"``, ``"cnn"``, ``"transformer"`` or ``"gan"``.
    data_path: for ``mlp``/``cnn``, a CIFAR-10 python-pickle folder instead of
      the digits; for ``transformer``, a text file or a folder of ``.txt``
      files instead of the standard-library docstrings.
    quick: a smaller configuration (fewer steps, a shorter corpus, fewer
      evaluation samples) for tests.

  Returns:
    A :class:`Task`.
  """
  if name in ("mlp", "cnn"):
    if data_path:
      images = data_lib.load_cifar10(data_path)
      source = "CIFAR-10"
    else:
      images = data_lib.load_digits()
      source = "digits"
    h, w, c = images.x_train.shape[1:]
    if name == "mlp":
      return _classification_task(
          "mlp", f"MLP {h * w * c}-256-256-{images.num_classes} on {source}",
          images, lambda r: models.MLP(h * w * c, (256, 256),
                                       images.num_classes, rngs=r),
          batch_size=64, steps=20 if quick else 600, eval_every=50)
    return _classification_task(
        "cnn", f"ResNet-style CNN (widths 8-16, GroupNorm) on {source}",
        images, lambda r: models.ResNetCNN(c, images.num_classes, (8, 16),
                                           groups=4, rngs=r),
        batch_size=32, steps=20 if quick else 300, eval_every=25)
  if name == "transformer":
    if data_path:
      text = data_lib.load_text_files(data_path)
    else:
      text = data_lib.load_stdlib_text(60_000 if quick else 400_000)
    return _language_model_task(text, context=32, dim=32, depth=2,
                                batch_size=16, steps=20 if quick else 400,
                                eval_every=50)
  if name == "gan":
    if data_path:
      raise ValueError("the gan task trains on the digits only; drop --data.")
    return _gan_task(latent=16, batch_size=64, steps=20 if quick else 1000,
                     eval_every=100, eval_samples=300 if quick else 1000)
  raise ValueError(f"unknown task {name!r}; choose one of {TASKS}.")
