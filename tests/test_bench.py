"""experiments/bench_search.py: which configurations a command line measures
(the measurements themselves are the benchmark's job, not a unit test's);
experiments/benchmarking.py's kernel count; experiments/bench_cpu_ops.py and
experiments/bench_gpu.py: smoke runs on a tiny geometry (bench_gpu's with
TensorFlow unimportable, as on the GPU machines)."""
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from conftest import ROOT, load_experiment


@pytest.fixture(scope='module')
def bench_module():
  return load_experiment('bench_search')  # defines its flags, once


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
                  (64, 8, 3, 16, 1, False, 'off'), (64, 8, 3, 16, 2, False, 'off'),
                  (64, 8, 3, 16, 4, False, 'off')]
  assert [s.get('cache_dir') for s in specs[:3]] == ['/tmp/cache', '/tmp/cache', None]


def test_base_config_runs_on_the_entry_scripts_device_count(bench):
  """The CPU backend's base row runs as --cpu_devices=0 would: NB201 split
  over the cores, DARTS on one device; the reference backend on one."""
  from snas_jax.backends.cpu import process
  for args, want in ((['--space=nb201', '--backend=cpu'], process.default_devices('nb201', [64])),
                     (['--space=darts', '--backend=cpu'], 1),
                     (['--space=nb201', '--backend=reference'], 1)):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['bench', '--cache_variant=false', '--remat_variant=false', *args])
    assert [s['devices'] for s in bench.specs('')] == [want]


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


def test_bench_nb201_convs_measures_every_row_on_a_tiny_geometry(tmp_path):
  """One device, one core (half the batch on 2 cores) and PyTorch where it is
  installed: positive times, and the work counted from the shapes."""
  out = tmp_path / 'convs.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'bench_nb201_convs.py'), '--batch_size=4',
       '--channels=4', '--layers=1', '--image_size=8', '--steps=1', '--warmup=1',
       f'--json_out={out}'], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())['results']
  cores = len(os.sched_getaffinity(0))
  try:
    import torch  # noqa: F401
    torch_rows = [('pytorch', 4, cores)]
  except ImportError:
    torch_rows = []
  assert [(r['variant'], r['images'], r['cores']) for r in rows] == [
      ('xla, one device', 4, cores), ('xla, one core', 4 // cores, 1)] + torch_rows
  # 3 stages x (3 + 2 + 1 edges) x (9 + 1 taps), C -> G·C, 2 FLOPs a multiply-add, 3 passes
  macs = sum((8 >> s) ** 2 * (4 << s) ** 2 * 6 * 10 for s in range(3))
  for r in rows:
    assert 'error' not in r, r
    assert r['gflop'] == round(3 * 2 * r['images'] * macs / 1e9, 3) > 0
    assert r['conv_ms'] > 0 and r['gflop_s'] > 0 and r['matmul_gflop_s'] > 0, r


# Hides tensorflow and tensorflow_datasets, as if not installed (import fails,
# importlib.util.find_spec finds nothing), in every process started with this
# as its sitecustomize: the GPU machines have neither.
NO_TENSORFLOW = '''
import importlib.machinery, sys
class _PathFinderWithoutTensorflow(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      return None
    return super().find_spec(name, path, target)
sys.meta_path[:] = [_PathFinderWithoutTensorflow if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
'''


def test_bench_gpu_runs_end_to_end_without_tensorflow(tmp_path):
  """A JAX row in bfloat16 and a PyTorch row on a tiny network, on the CPU,
  with TensorFlow unimportable in every process: the JSON has both rows'
  figures and the environment."""
  pytest.importorskip('torch')
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(NO_TENSORFLOW)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [str(site), os.environ.get('PYTHONPATH')])))
  hidden = subprocess.run([sys.executable, '-c', 'import tensorflow_datasets'], env=env,
                          capture_output=True, text=True)
  assert "No module named 'tensorflow_datasets'" in hidden.stderr  # installed here, hidden there
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'bench_gpu.py'), f'--out={out}',
       '--rows=jax_bfloat16,torch_float32_channels_last', '--channels=4', '--layers=1',
       '--image_size=8', '--batch_size=4', '--steps=1', '--warmup=0'],
      capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / 'bench_gpu.json').read_text())
  assert report['environment']['config']['channels'] == 4
  assert report['environment']['torch'] != '-' and report['environment']['jax'] != '-'
  jax_row, torch_row = report['results']
  for row in (jax_row, torch_row):
    assert 'error' not in row, row
    assert row['device_kind'] == 'cpu' and row['batch_size'] == 4
    assert row['step_s'] > 0 and row['init_s'] > 0
    assert abs(row['images_per_s'] - 4 / row['step_s']) < 0.02 * row['images_per_s'] + 0.1
  assert (jax_row['row'], jax_row['dtype'], jax_row['backend']) == ('jax_bfloat16', 'bfloat16',
                                                                    'reference')
  assert jax_row['trace_s'] > 0 and jax_row['compile_s'] > 0
  assert (torch_row['dtype'], torch_row['layout'], torch_row['channels_last']) == (
      'float32', 'channels_last', True)
  assert torch_row['first_step_s'] > 0


def test_bench_gpu_reports_rows_past_its_budget_as_skipped(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'bench_gpu.py'), f'--out={tmp_path}',
       '--budget_s=0', '--rows=jax_float32,torch_bfloat16'],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'bench_gpu.json').read_text())['results']
  assert [(r['row'], r['error']) for r in rows] == [
      ('jax_float32', 'skipped: 0 s of --budget_s left'),
      ('torch_bfloat16', 'skipped: 0 s of --budget_s left')]


def test_bench_gpu_refuses_an_unknown_row_before_running_any(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'bench_gpu.py'), f'--out={tmp_path}',
       '--rows=torch_float32,jax_float16'], capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown row 'jax_float16'")
  assert not (tmp_path / 'bench_gpu.json').exists()


def test_bench_pytorch_times_the_nb201_supernet_this_code_runs():
  """--space=nb201: AutoDL-Projects' supernet, with as many weights as this
  code's NB201 search network of the same size."""
  pytest.importorskip('torch')
  pytest.importorskip('xautodl')
  import jax
  import numpy as np
  from snas_jax.spaces import nb201
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'bench_pytorch.py'), '--space=nb201',
       '--channels=4', '--layers=1', '--batch_size=4', '--image_size=8', '--steps=1',
       '--warmup=0', '--device=cpu'], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  net = nb201.build_search_network(4, 1, 10)
  z = {nb201.CELL_TYPE: np.zeros((len(nb201.EDGES), len(nb201.OP_NAMES)), np.float32)}
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), np.zeros((2, 8, 8, 3)), z,
                                           False))['params']
  assert row['space'] == 'nb201' and row['step_s'] > 0
  assert row['params'] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
