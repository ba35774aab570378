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


TRIM_CHECK = """
import ctypes, jax, jax.numpy as jnp
calls = []
class FakeLibc:
  def malloc_trim(self, pad):
    calls.append(pad)
ctypes.CDLL = lambda name: FakeLibc()
from snas_jax import cli
cli.trim_heap_after_compiles(min_seconds={min_seconds})
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
print(len(calls))
"""


@pytest.mark.parametrize('min_seconds, expected', [(0.0, 1), (1e9, 0)])
def test_heap_is_trimmed_after_long_compiles_only(min_seconds, expected):
  """malloc_trim(0) runs after a compilation that took at least min_seconds."""
  proc = subprocess.run([sys.executable, '-c', TRIM_CHECK.format(min_seconds=min_seconds)],
                        capture_output=True, text=True, cwd=ROOT, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-2000:]
  calls = int(proc.stdout.split()[-1])
  assert (calls >= 1) if expected else (calls == 0)


def test_xla_defaults_leave_the_users_flags_alone():
  """Importing snas_jax adds its XLA:CPU scheduler default unless XLA_FLAGS has one."""
  code = 'import os, snas_jax; print(os.environ["XLA_FLAGS"])'
  for given, expected in (('--xla_cpu_opt_preset=CPU_OPT_PRESET_DEFAULT',
                           ['--xla_cpu_opt_preset=CPU_OPT_PRESET_DEFAULT',
                            '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED']),
                          ('--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT',
                           ['--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT'])):
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env=dict(os.environ, XLA_FLAGS=given))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == expected


RESTART_CHECK = """
import os, sys
sys.path.insert(0, {root!r})
from snas_jax import cli
preload = os.environ.get('LD_PRELOAD', '').split(':')
print('run', sys.argv[1:], os.environ.get('GLIBC_TUNABLES', ''),
      [os.path.basename(p).split('-')[0] for p in preload if p], cli.memory_tuning(), flush=True)
cli.restart_with_memory_tuning()
"""


_KEEP = 'glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=33554432'


@pytest.mark.parametrize('given, expected', [
    ('', f'glibc.malloc.hugetlb=1:{_KEEP}'),
    ('glibc.malloc.check=0', f'glibc.malloc.check=0:glibc.malloc.hugetlb=1:{_KEEP}'),  # kept, extended
    ('glibc.malloc.trim_threshold=5', 'glibc.malloc.trim_threshold=5:glibc.malloc.hugetlb=1:'
     'glibc.malloc.mmap_threshold=33554432'),  # the user's own value wins
])
def test_restart_with_memory_tuning_runs_the_script_again_once(tmp_path, given, expected):
  """The script runs twice, the second time (same arguments) with glibc asked
  for huge pages and a kept heap (where the user did not set them) and the
  block cache preloaded; the second run does not restart again."""
  script = tmp_path / 'script.py'
  script.write_text(RESTART_CHECK.format(root=ROOT))
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'SNAS_JAX_MEMORY_TUNED')}
  proc = subprocess.run([sys.executable, str(script), '--flag=1'], capture_output=True, text=True,
                        timeout=120, env=dict(env, GLIBC_TUNABLES=given))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines() == [
      f"run ['--flag=1'] {given} [] off",
      f"run ['--flag=1'] {expected} ['block_cache'] huge pages + "
      f"{'heap kept + ' if _KEEP.split(':')[0] in expected else ''}block cache"]
