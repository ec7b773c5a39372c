"""Shared test set-up.

Eight simulated CPU devices are requested before JAX is imported, so that the
sharding tests run on a real (simulated) mesh; single-device tests are
unaffected (arrays live on device 0 unless sharded).
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The simulated devices meet in XLA:CPU's collectives, which abort the
# process when one device has not arrived after 40 s; on a busy 2-core
# machine (the other test worker, multi-process tests) a device thread can
# wait that long. Ten minutes, so that only a real hang aborts.
if "collective_call_terminate_timeout" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (
    " --xla_cpu_collective_call_terminate_timeout_seconds=600"
  )
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MADAM_QUICK", "1")  # notebooks and examples: quick mode

from hypothesis import settings  # noqa: E402
import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

# The suite draws the same examples on every run (derandomize), so that a
# red run is reproducible and main does not turn red by chance; the
# "explore" profile (HYPOTHESIS_PROFILE=explore) draws new ones each run, to
# search for failures (with test_fuzz.py's long profile for the fuzz).
settings.register_profile(
  "ci", max_examples=40, deadline=None, derandomize=True
)
settings.register_profile("explore", max_examples=200, deadline=None)
_profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(_profile if _profile == "explore" else "ci")


@pytest.fixture(scope="session")
def eight_devices():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 (simulated) devices: set XLA_FLAGS before JAX import")
  return devices[:8]
