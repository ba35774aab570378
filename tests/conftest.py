"""Shared test set-up: one persistent XLA cache for the whole session, so the
tiny search network compiles once across the CLI runs of the tests."""
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_DIR = os.path.join(ROOT, '..', 'shared', 'data', 'cifar10')
CACHE_DIR = os.path.join(tempfile.gettempdir(), 'snas_jax_test_xla_cache')

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', CACHE_DIR)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')


def run_script(script, *args, env=None, timeout=600):
  """Runs experiments/<script> in a subprocess; returns CompletedProcess."""
  import subprocess
  full_env = dict(os.environ, **(env or {}))
  full_env.pop('XLA_FLAGS', None) if env is None or 'XLA_FLAGS' not in env else None
  return subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', script), *args,
                         f'--compilation_cache_dir={CACHE_DIR}'],
                        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope='session')
def cifar_dir():
  if not os.path.exists(os.path.join(CIFAR_DIR, 'train.npz')):
    pytest.skip(f'local CIFAR-10 copy not found at {CIFAR_DIR}')
  return CIFAR_DIR
