"""experiments/bench_search.py: which configurations a command line measures
(the measurements themselves are the benchmark's job, not a unit test's);
experiments/benchmarking.py's kernel count; experiments/bench_cpu_ops.py: a
smoke run on a tiny geometry."""
import importlib.util
import json
import os
import subprocess
import sys

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


def test_fused_kernels_counts_the_optimised_programs_fusions():
  import jax
  from experiments import benchmarking
  import jax.numpy as jnp
  one = jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(1000)).compile()
  assert benchmarking.fused_kernels(one) == 1  # one elementwise chain: one loop fusion

  class NoText:
    def as_text(self):
      raise RuntimeError('no HLO')
  assert benchmarking.fused_kernels(NoText()) is None


def test_bench_cpu_ops_measures_every_row_on_a_tiny_geometry(tmp_path):
  """Every section, one geometry each, the cell's second scheduler in a child
  process: each row's times positive, native rows running custom calls."""
  out = tmp_path / 'ops.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'bench_cpu_ops.py'), '--batch_size=2',
       '--image_size=8', '--channels=8', '--strides=2', '--dilations=2', '--layers=1',
       '--schedulers=DEFAULT', '--steps=1', '--warmup=1', '--tune_memory=false',
       f'--json_out={out}'], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  native = ('native',) if report['environment']['native'] == 'built' else ()
  rows = report['results']
  ops = {'depthwise': ('reference', 'shift', 'shift autodiff') + native,
         'dilconv': ('reference', 'shift') + native, 'pool': ('reference', 'shift') + native}
  want = [('bandwidth', 'new buffer'), ('bandwidth', 'in place')]
  want += [(section, v) for section, variants in ops.items()
           for _ in range(2 if section == 'pool' else 1) for v in variants]  # pools: max, avg
  impl = 'native' if native else 'shift'
  want += [('cell', f'{impl}, DEFAULT scheduler'),
           ('cell', f'{impl}, MEMORY_OPTIMIZED scheduler, materialize off'),
           ('init', 'reference'), ('init', 'cpu')]
  assert [(r['section'], r['variant']) for r in rows] == want
  for r in rows:
    assert 'error' not in r, r
    timed = ('init_s',) if r['section'] == 'init' else ('step_ms', 'kernels')
    assert all(r[key] > 0 for key in ('compile_s',) + timed), r
    assert all(r.get(key, 0) >= 0 for key in ('temp_mb', 'faults', 'calls')), r
    if r['section'] == 'bandwidth':
      assert r['gb_s'] > 0
    if r['section'] in ops:
      assert (r['calls'] > 0) == (r['variant'] == 'native'), r
