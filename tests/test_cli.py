"""snas_jax.cli: runtime set-up shared by the entry scripts."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

COUNT_DEVICES = ('from snas_jax import cli; cli.set_cpu_devices({n}); import jax; '
                 'print(jax.device_count())')


@pytest.mark.parametrize('n, xla_flags, expected', [
    (2, '', 2),   # --cpu_devices=2: two CPU devices
    (0, '', 1),   # 0: XLA's default
    (2, '--xla_force_host_platform_device_count=3', 3),  # the user's XLA_FLAGS win
])
def test_cpu_devices_sets_the_xla_device_count(n, xla_flags, expected):
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', COUNT_DEVICES.format(n=n)], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[-1] == str(expected)
