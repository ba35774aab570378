"""The CPU backend's tests: skipped where JAX does not run on the CPU (they
compare this backend with the reference on XLA:CPU)."""
import jax
import pytest


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == 'cpu':
    return
  skip = pytest.mark.skip(reason=f'the CPU backend runs on the CPU; JAX runs on {jax.default_backend()}')
  for item in items:
    if 'cpu_backend' in str(item.fspath):
      item.add_marker(skip)
