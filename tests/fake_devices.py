"""The environment for a subprocess that sees N fake CPU devices.

XLA's CPU collectives wait for every device's thread at a rendezvous and abort the process after 40 s by
default. On two CPU cores shared with another pytest worker, one of eight device threads can be starved that
long, so the subprocesses raise the limits: a slow machine then runs slowly instead of aborting.
"""

from __future__ import annotations

import os

PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                       "--xla_cpu_collective_timeout_seconds=900")


def fake_device_env(num_devices: int, **extra: str) -> dict[str, str]:
    """os.environ plus JAX_PLATFORMS=cpu and XLA_FLAGS for `num_devices` CPU devices with patient collectives."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices} {PATIENT_COLLECTIVES}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip(), **extra}
