"""Shared test set-up.

Eight simulated CPU devices are requested before JAX is imported, so that the
sharding tests run on a real (simulated) mesh; single-device tests are
unaffected (arrays live on device 0 unless sharded).
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MADAM_QUICK", "1")  # notebooks and examples: quick mode

from hypothesis import settings  # noqa: E402
import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def eight_devices():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 (simulated) devices: set XLA_FLAGS before JAX import")
  return devices[:8]
