"""snas_jax.cli and the CPU backend's process settings (snas_jax/backends/cpu/process.py):
the start-up shared by the entry scripts, and the backend selection rule."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

COUNT_DEVICES = ('from snas_jax.backends.cpu import process; process.configure(False, {n}); '
                 'import jax; print(jax.device_count())')


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


@pytest.mark.parametrize('space, batches, processes, cores, expected', [
    ('nb201', [64, 256], 1, 2, 2),   # one device per core
    ('nb201', [64, 256], 1, 16, 4),  # at least 16 images a device: 64 / 4
    ('nb201', [48, 48], 1, 4, 3),    # the largest count dividing the batch
    ('nb201', [24, 256], 1, 2, 1),   # 12 images a device are too few
    ('nb201', [64, 256], 2, 2, 1),   # a multi-process run: one device per process
    ('darts', [64, 256], 1, 2, 1),   # the backend's forms: their kernels use every core
])
def test_default_cpu_devices(space, batches, processes, cores, expected):
  from snas_jax.backends.cpu import process
  assert process.default_devices(space, batches, processes, cores) == expected


def test_forms_spaces_are_those_whose_networks_take_forms():
  from snas_jax import spaces
  from snas_jax.backends.cpu import process
  takes_forms = {name for name, space in spaces.SPACES.items()
                 if hasattr(space.search_network(4, 1, 10), 'forms')}
  assert takes_forms == process.FORMS_SPACES


TRIM_CHECK = """
import ctypes, jax, jax.numpy as jnp
calls = []
class FakeLibc:
  def malloc_trim(self, pad):
    calls.append(pad)
ctypes.CDLL = lambda name: FakeLibc()
from snas_jax.backends.cpu import process
process.trim_heap_after_compiles(min_seconds={min_seconds})
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
  """Importing snas_jax changes no environment variable; the CPU backend's
  settings add its XLA:CPU scheduler default unless XLA_FLAGS has one."""
  code = ('import os, snas_jax, snas_jax.search, snas_jax.train; before = dict(os.environ); '
          'from snas_jax.backends.cpu import process; assert dict(os.environ) == before; '
          'process.configure(False, 0); print(os.environ["XLA_FLAGS"])')
  for given, expected in (('--xla_cpu_opt_preset=CPU_OPT_PRESET_DEFAULT',
                           ['--xla_cpu_opt_preset=CPU_OPT_PRESET_DEFAULT',
                            '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED']),
                          ('--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT',
                           ['--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT'])):
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env=dict(os.environ, XLA_FLAGS=given))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == expected


@pytest.mark.parametrize('name, platform, expected', [
    ('auto', 'cpu', 'cpu'), ('auto', 'accelerator', 'reference'),
    ('reference', 'cpu', 'reference'), ('cpu', 'accelerator', 'cpu'),
    ('reference', 'accelerator', 'reference')])
def test_backend_selection_rule(name, platform, expected):
  from snas_jax import backends
  assert backends.resolve(name, platform) == expected


def test_unknown_backend_is_one_line_and_platform_detection_needs_no_jax(monkeypatch):
  from snas_jax import backends
  with pytest.raises(ValueError, match=r"unknown --backend='tpu'; choose one of auto, reference, cpu"):
    backends.resolve('tpu', 'cpu')
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert backends.host_platform() == 'accelerator'
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert backends.host_platform() == 'cpu'
  monkeypatch.delenv('JAX_PLATFORMS')
  assert backends.host_platform() == 'cpu'  # no accelerator plugin is installed here


def test_cpu_devices_with_the_reference_backend_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'search_cifar.py'),
                         f'--workdir={tmp_path}', '--backend=reference', '--cpu_devices=2'],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith(
      'error: --cpu_devices splits the CPU for --backend=cpu')


RESTART_CHECK = """
import os, sys
sys.path.insert(0, {root!r})
from snas_jax.backends.cpu import process
preload = os.environ.get('LD_PRELOAD', '').split(':')
print('run', sys.argv[1:], os.environ.get('GLIBC_TUNABLES', ''),
      [os.path.basename(p).split('-')[0] for p in preload if p], process.memory_tuning(), flush=True)
process.restart_with_memory_tuning()
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
