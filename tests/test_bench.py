"""experiments/bench_search.py: which configurations a command line measures
(the measurements themselves are the benchmark's job, not a unit test's)."""
import importlib.util
import os

import pytest
from absl import flags

from conftest import ROOT


@pytest.fixture(scope='module')
def bench_module():
  path = os.path.join(ROOT, 'experiments', 'bench_search.py')
  spec = importlib.util.spec_from_file_location('bench_search', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # defines its flags, once
  return module


@pytest.fixture()
def bench(bench_module):
  yield bench_module
  flags.FLAGS.unparse_flags()


def test_sweeps_vary_one_field_of_the_base_config(bench):
  flags.FLAGS(['bench', '--channels=8', '--layers=3', '--image_size=16',
               '--sweep=batch,devices', '--sweep_batch=16,128'])
  specs = bench.specs('/tmp/cache')
  rows = [(s['batch_size'], s['channels'], s['layers'], s['image_size'], s['devices'], s['remat'],
           s['cache']) for s in specs]
  assert rows == [(64, 8, 3, 16, 1, False, 'cold'), (64, 8, 3, 16, 1, False, 'warm'),  # base twice
                  (64, 8, 3, 16, 1, True, 'off'),  # its remat variant
                  (16, 8, 3, 16, 1, False, 'off'), (128, 8, 3, 16, 1, False, 'off'),
                  (64, 8, 3, 16, 2, False, 'off'), (64, 8, 3, 16, 4, False, 'off')]
  assert [s.get('cache_dir') for s in specs[:3]] == ['/tmp/cache', '/tmp/cache', None]


def test_unknown_sweep_is_a_one_line_error(bench):
  flags.FLAGS(['bench', '--sweep=batch,colours'])
  with pytest.raises(SystemExit, match="unknown sweep 'colours'"):
    bench.specs('')


def test_fused_kernels_counts_the_optimised_programs_fusions(bench):
  import jax
  import jax.numpy as jnp
  one = jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(1000)).compile()
  assert bench.fused_kernels(one) == 1  # one elementwise chain: one loop fusion

  class NoText:
    def as_text(self):
      raise RuntimeError('no HLO')
  assert bench.fused_kernels(NoText()) is None
