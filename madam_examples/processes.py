"""What several JAX processes must agree on, checked without waiting forever.

With ``jax.distributed`` every process must call the same collectives in
the same order, or all of them wait forever. :func:`check_same_settings`
stops every process at start-up, naming the setting that differs;
:func:`sync` is a barrier whose timeout names the processes that did not
arrive; :func:`gather` meets at such a barrier first (CPU collectives over
Gloo give up after 30 s, and one process may still be compiling). With one
process, all are trivial.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

import jax
import numpy as np

from madam_examples import cli

BARRIER_TIMEOUT_S = 600.0
_PREFIX = "madam_examples"
_COUNT = [0]


class ProcessesDisagree(RuntimeError):
  """The processes of one run differ (settings), or one did not arrive."""


def _client() -> Any:
  from jax._src import distributed  # pylint: disable=import-outside-toplevel

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed.initialize() was not called.")
  return client


def sync(name: str, timeout_s: float | None = None) -> None:
  """Waits until every JAX process gets here (nothing with one process).

  Raises:
    ProcessesDisagree: after ``timeout_s`` seconds (default
      :data:`BARRIER_TIMEOUT_S`), naming the processes that did not arrive.
  """
  if jax.process_count() == 1:
    return
  timeout_s = BARRIER_TIMEOUT_S if timeout_s is None else timeout_s
  _COUNT[0] += 1
  key, client = f"{_PREFIX}/{name}/{_COUNT[0]}", _client()
  client.key_value_set(f"{key}/arrived/{jax.process_index()}", "1")
  try:
    client.wait_at_barrier(key, int(timeout_s * 1000))
  except Exception as e:  # jaxlib's error: DEADLINE_EXCEEDED, or a peer gone
    arrived = {k.rsplit("/", 1)[-1] for k, _ in _dir_get(f"{key}/arrived/")}
    missing = [
      str(i) for i in range(jax.process_count()) if str(i) not in arrived
    ]
    raise ProcessesDisagree(
      f"process {', '.join(missing) or '(unknown)'} of {jax.process_count()} "
      f"did not reach '{name}' within {timeout_s:g} s (this is process "
      f"{jax.process_index()}); it is stuck, was started late, or died: see "
      "its log."
    ) from e


def _dir_get(key: str) -> list[tuple[str, str]]:
  try:
    return _client().key_value_dir_get(key)
  except Exception:  # pylint: disable=broad-except  # service gone
    return []


def check_same_settings(settings: dict[str, Any], timeout_s: float) -> None:
  """Raises :class:`ProcessesDisagree` unless every process has ``settings``.

  Each process publishes its settings (JSON) through the coordination
  service, meets the others (:func:`sync`) and compares theirs with its
  own: no collective, so it works before any array exists.

  Example:
    >>> check_same_settings({"steps": 10}, 5.0)     # one process: nothing
  """
  if jax.process_count() == 1:
    return
  key = f"{_PREFIX}-settings/"
  _client().key_value_set(
    f"{key}{jax.process_index()}", json.dumps(settings, sort_keys=True)
  )
  sync("settings", timeout_s)
  seen = sorted(
    (int(k.rsplit("/", 1)[-1]), json.loads(v)) for k, v in _dir_get(key)
  )
  diffs = []
  for name in sorted({n for _, s in seen for n in s}):
    values = [(i, s.get(name)) for i, s in seen]
    if any(v != values[0][1] for _, v in values):
      each = ", ".join(f"process {i} {v!r}" for i, v in values)
      diffs.append(f"{name}: {each}")
  if diffs:
    raise ProcessesDisagree(
      f"the processes were started with different settings ({'; '.join(diffs)}"
      "). Start every process with the same flags (only --metrics-out may "
      "differ)."
    )


def gather(values: Any) -> np.ndarray:
  """Every process's small integer array ``values`` (the same shape on all),
  stacked in process order. A collective: every process must call it.

  Example:
    >>> gather([3, 1])      # one process
    array([[3, 1]], dtype=int32)
  """
  values = np.asarray(values, np.int32)
  if jax.process_count() == 1:
    return values[None]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  sync("gather")
  return np.asarray(multihost_utils.process_allgather(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags :func:`initialise_runtime` reads."""
  add = parser.add_argument
  add("--simulate-devices", type=cli.positive_int, default=None,
      help="split the host CPU into this many JAX devices (a mesh without "
      "accelerators)")  # fmt: skip
  add("--distributed", action="store_true",
      help="call jax.distributed.initialize() (auto-detects Cloud TPU, "
      "SLURM, Open MPI)")  # fmt: skip
  add("--coordinator-address", default=None, help="host:port of process 0")
  add("--num-processes", type=cli.positive_int, default=None)
  add("--process-id", type=cli.nonnegative_int, default=None)
  add("--initialization-timeout", type=cli.positive_int, default=300,
      help="seconds to wait for every process at the coordinator (default "
      "300)")  # fmt: skip


def initialise_runtime(args: argparse.Namespace, prog: str) -> None:
  """Simulated CPU devices or the multi-host runtime: before any JAX use.

  With several processes on CPU devices, their collectives go over Gloo
  (TCP). Every process must reach the coordinator within
  ``args.initialization_timeout`` seconds, or each stops with one line.
  """
  if args.simulate_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.simulate_devices)
  if args.distributed or args.coordinator_address:
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS")
    if args.simulate_devices or platforms == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = args.initialization_timeout
    who = f"process {args.process_id} of {args.num_processes}"
    who = "this process" if args.process_id is None else who
    where = args.coordinator_address or "the auto-detected coordinator"
    message = (
      f"{prog}: error: {who}: not every process reached the coordinator at "
      f"{where} within {timeout} s (--initialization-timeout). Start every "
      "process with the same --coordinator-address and --num-processes "
      "and its own --process-id (on one machine, python -m "
      "madam_examples.launch_local does it)."
    )

    def expire():  # before JAX's own timeout, which aborts with a C++ trace
      sys.stdout.flush()
      print(message, file=sys.stderr, flush=True)
      os._exit(2)

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
      jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=timeout + 60,
      )
    finally:
      timer.cancel()
