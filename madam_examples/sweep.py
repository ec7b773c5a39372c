"""The learning-rate sweep of ``madam-demo``: run, summarise, plot.

Every (rate, seed) run of one optimizer is one ``jax.vmap``-ed program; a
rate is "good" when its mean held-out accuracy is within a point of the
optimizer's best, and the good rates' spread is counted in decades.

Reference: Bernstein et al., arXiv:2006.14560, Figure 1.
"""

from __future__ import annotations

from concurrent import futures
import math
import time
from typing import Sequence

import jax
from matplotlib.figure import Figure
import numpy as np

from madam_examples import loop


def good_rates(rates, accuracy, within: float) -> list[float]:
  """The rates whose mean accuracy is within ``within`` points of the best.

  Example:
    >>> good_rates([0.1, 0.01, 0.001], [90.0, 97.5, 98.0], 1.0)
    [0.01, 0.001]
  """
  return [r for r, a in zip(rates, accuracy) if a >= max(accuracy) - within]


def spread_decades(rates: Sequence[float]) -> float:
  """How far apart the rates lie: ``log10(largest / smallest)``.

  Example:
    >>> spread_decades([0.001, 0.00316, 0.1])
    2.0
  """
  return math.log10(max(rates) / min(rates))


def summarise(rates, accuracy, default_rate: float, within: float) -> dict:
  """One optimizer's summary, from accuracy ``[rate, seed]``."""
  mean = [float(a) for a in accuracy.mean(axis=1)]
  good = good_rates(rates, mean, within)
  best = int(np.argmax(mean))
  at = int(np.argmin([abs(r - default_rate) for r in rates]))
  return {
    "default_rate": default_rate,
    "accuracy_at_default": mean[at],
    "best_rate": rates[best],
    "best_accuracy": mean[best],
    "good_rates": good,
    "good_spread_decades": spread_decades(good),
    "default_is_good": rates[at] in good,
  }


def sweep(task, labels: dict, rates, seeds: list[int], steps: int) -> dict:
  """Each optimizer's (rate, seed) runs as one ``vmap``-ed program, the
  programs compiled side by side (XLA compiles outside Python's lock)."""
  # Seed s starts from the same weights and batches at every rate.
  keys = jax.vmap(jax.random.key)(np.tile(seeds, len(rates)))
  lrs = np.repeat(np.float32(rates), len(seeds))
  evals = steps // min(4, steps)  # the final loss: the last quarter's mean

  def compiled(opt):
    run = jax.vmap(loop.make_run_fn(task, opt, steps, evals), (0, 0, None))
    return jax.jit(run).lower(keys, lrs, task.data).compile()

  start = time.perf_counter()
  with futures.ThreadPoolExecutor(len(labels)) as pool:
    programs = dict(zip(labels, pool.map(compiled, labels)))
  compile_seconds = time.perf_counter() - start
  print(f"compiled {len(labels)} programs in {compile_seconds:.1f} s")
  results = {}
  for opt, program in programs.items():
    start = time.perf_counter()
    h = jax.device_get(program(keys, lrs, task.data))
    seconds = time.perf_counter() - start
    print(f"{labels[opt]:<20} trained in {seconds:.1f} s", flush=True)
    final = {
      k: np.float64(v[:, -1]).reshape(len(rates), -1) for k, v in h.items()
    }
    loss = final[f"{next(iter(task.losses))}_loss"]
    diverged = ~np.isfinite(loss + final["test_loss"])
    results[opt] = {  # a diverged run counts as 0 % accurate
      "accuracy": np.where(diverged, 0.0, final[task.metric]),
      "train_loss": np.where(diverged, np.nan, loss),
      "compile_seconds": compile_seconds,
      "train_seconds": seconds,
    }
  return results


def figure(record: dict, labels: dict) -> Figure:
  """The sweep's figure from its JSON ``record``: mean accuracy (band: worst
  to best seed, star: the default rate) and final training loss."""
  fig = Figure(figsize=(12, 4.6))
  acc_ax, loss_ax = fig.subplots(1, 2)
  x = np.asarray(record["learning_rates"])
  for i, (opt, r) in enumerate(record["results"].items()):
    acc = np.asarray(r["accuracy"], np.float64)
    loss = np.asarray(r["train_loss"], np.float64).mean(1)  # nan: diverged
    d = int(np.argmin(np.abs(x - r["default_rate"])))
    good = f"{min(r['good_rates']):.2g} to {max(r['good_rates']):.2g}"
    label = f"{labels[opt]}: good from {good}"
    acc_ax.plot(x, acc.mean(1), "o-", color=f"C{i}", label=label)
    acc_ax.fill_between(x, acc.min(1), acc.max(1), color=f"C{i}", alpha=0.15)
    acc_ax.plot(x[d], acc.mean(1)[d], "*", color=f"C{i}", ms=18, mec="k")
    loss_ax.plot(x, loss, "o-", color=f"C{i}", label=labels[opt])
  acc_ax.set(ylim=(0, 100), ylabel="held-out accuracy (%), *: default")
  loss_ax.set(yscale="log", ylabel="final training loss (nats)")
  for ax in (acc_ax, loss_ax):
    ax.set(xscale="log", xlabel="learning rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
  fig.suptitle(
    f"One learning rate for all? {record['task']}, {record['steps']} steps, "
    f"mean of {len(record['seeds'])} seeds"
  )
  fig.tight_layout()
  return fig
