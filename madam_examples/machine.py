"""The machine description recorded beside every benchmark result.

One place for what ``benchmarks/*.py`` write into their results: the CPU
model, core count, Python/JAX/Optax/Flax versions, JAX backend and date, and
the load average (the machine may be shared, so timings need it).
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any


def cpu_model() -> str:
  """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next((line.split(":", 1)[1].strip() for line in f
                   if line.startswith("model name")), cpu)
  except OSError:
    return cpu


def utc_now(fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
  """The current UTC date and time, formatted."""
  return datetime.datetime.now(datetime.timezone.utc).strftime(fmt)


def load_average() -> list[float] | None:
  """1, 5 and 15-minute load averages, or ``None`` where there are none."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except (AttributeError, OSError):
    return None


def machine_info(**extra: Any) -> dict[str, Any]:
  """Date, CPU, cores, versions and backend, then ``extra`` entries.

  ``flax`` is ``None`` when Flax is not installed.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  try:
    import flax  # pylint: disable=import-outside-toplevel
    flax_version = flax.__version__
  except ImportError:
    flax_version = None
  info = dict(date=utc_now(), cpu=cpu_model(), cores=os.cpu_count(),
              python=platform.python_version(), jax=jax.__version__,
              optax=optax.__version__, flax=flax_version,
              backend=jax.default_backend())
  info.update(extra)
  return info
