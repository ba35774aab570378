"""This code's search step beside the authors' PyTorch network, on one GPU, in one run.

  python experiments/bench_gpu.py --out=$OUT        # the paper's configuration, ~5 minutes

Measures, each configuration in its own process with its own time limit (a
failure or a timeout costs that row only): the PyTorch search network
(experiments/bench_pytorch.py) in float32 and under bfloat16 autocast (NCHW
and channels_last), and this code's search step on the reference backend
(experiments/bench_search.py) in float32 and with --dtype=bfloat16. For each:
init, trace and compile (JAX), the first step (PyTorch: cuDNN's autotuning),
the median step, images/s and the device's peak memory. Synthetic images,
the paper's configuration (C=16, 8 cells, batch 64, 32x32) unless told
otherwise. Writes <out>/bench_gpu.json (after each row) and prints the table.

Needs JAX (+ Flax, Optax, Orbax) and PyTorch, nothing else: no TensorFlow
(tests/test_bench.py runs it with TensorFlow made unimportable). Without a
GPU the same rows run on the CPU (the tests' tiny configuration).
"""
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments import benchmarking  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

flags.DEFINE_string('out', '', 'Folder to write bench_gpu.json into (created if missing).')
flags.DEFINE_integer('batch_size', 64, 'Batch of every configuration.')
flags.DEFINE_integer('channels', 16, 'C of the search network.')
flags.DEFINE_integer('layers', 8, 'Cells of the search network.')
flags.DEFINE_integer('image_size', 32, 'Image side.')
flags.DEFINE_integer('steps', 5, 'Timed steps per configuration (the median is reported).')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation (PyTorch: after the first).')
flags.DEFINE_list('rows', ['torch_float32', 'torch_bfloat16_channels_last', 'jax_float32',
                           'jax_bfloat16', 'torch_bfloat16', 'torch_float32_channels_last'],
                  'Configurations, in the order they run: jax_<dtype>, torch_<dtype> or '
                  'torch_<dtype>_channels_last, dtype float32 or bfloat16.')
flags.DEFINE_integer('budget_s', 330, 'Wall-clock seconds for the whole run: a row gets at most '
                     'what is left (JAX rows at most --jax_timeout_s, PyTorch rows '
                     '--torch_timeout_s); a row that cannot start is reported as skipped.')
flags.DEFINE_integer('jax_timeout_s', 170, 'Time limit of one JAX row (init + compile + steps).')
flags.DEFINE_integer('torch_timeout_s', 60, 'Time limit of one PyTorch row.')
FLAGS = flags.FLAGS

DTYPES = ('float32', 'bfloat16')
MIN_ROW_S = 20  # a row with less time than this left is skipped, not started


def row_command(name: str) -> tuple:
  """(argv, the row's description) of configuration ``name``."""
  framework, _, rest = name.partition('_')
  dtype = rest.removesuffix('_channels_last')
  if framework not in ('jax', 'torch') or dtype not in DTYPES or (
      framework == 'jax' and rest != dtype):
    raise SystemExit(f'error: unknown row {name!r}; use jax_<dtype>, torch_<dtype> or '
                     f'torch_<dtype>_channels_last with dtype float32 or bfloat16')
  size = dict(batch_size=FLAGS.batch_size, channels=FLAGS.channels, layers=FLAGS.layers,
              image_size=FLAGS.image_size)
  steps = [f'--steps={FLAGS.steps}', f'--warmup={FLAGS.warmup}']
  if framework == 'jax':
    spec = {**size, 'remat': False, 'backend': 'reference', 'devices': 1, 'cache': 'off',
            'dtype': dtype}
    return [sys.executable, os.path.join(HERE, 'bench_search.py'), f'--child={json.dumps(spec)}',
            *steps], {'row': name, 'framework': 'snas_jax', 'dtype': dtype, 'layout': 'NHWC'}
  channels_last = rest.endswith('_channels_last')
  argv = [sys.executable, os.path.join(HERE, 'bench_pytorch.py'),
          *(f'--{k}={v}' for k, v in size.items()), *steps, f'--dtype={dtype}']
  return argv + ['--channels_last'] * channels_last, {
      'row': name, 'framework': 'pytorch', 'dtype': dtype,
      'layout': 'channels_last' if channels_last else 'NCHW'}


def run_rows(names, deadline: float):
  for name in names:
    argv, row = row_command(name)
    left = deadline - time.monotonic()
    if left < MIN_ROW_S:
      yield {**row, 'error': f'skipped: {max(left, 0):.0f} s of --budget_s left'}
      continue
    limit = min(left, FLAGS.jax_timeout_s if row['framework'] == 'snas_jax'
                else FLAGS.torch_timeout_s)
    t = time.monotonic()
    result = benchmarking.run_json_process(argv, row, timeout=limit)
    yield {**row, **result, 'wall_s': round(time.monotonic() - t, 1)}


def environment() -> dict:
  """Versions and machine, read without starting JAX or CUDA here (the
  children own the GPU, one at a time)."""
  def version(dist):
    try:
      return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      return '-'
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                            text=True, cwd=HERE, timeout=10).stdout.strip() or '-'
  except (OSError, subprocess.TimeoutExpired):
    commit = '-'
  gpu = '-'
  try:
    gpu = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version', '--format=csv,noheader'],
                         capture_output=True, text=True, timeout=20).stdout.strip() or '-'
  except (OSError, subprocess.TimeoutExpired):
    pass
  return {'machine': benchmarking.machine(), 'gpu': gpu, 'commit': commit,
          'python': platform.python_version(),
          **{name: version(name) for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch')},
          'config': {'batch_size': FLAGS.batch_size, 'channels': FLAGS.channels,
                     'layers': FLAGS.layers, 'image_size': FLAGS.image_size,
                     'steps': FLAGS.steps, 'warmup': FLAGS.warmup}}


def main(argv):
  del argv
  if not FLAGS.out:
    raise SystemExit('error: --out is required: the folder for bench_gpu.json')
  for name in FLAGS.rows:
    row_command(name)  # every name checked before anything runs
  os.makedirs(FLAGS.out, exist_ok=True)
  cols = ('row', 'device_kind', 'init_s', 'trace_s', 'compile_s', 'first_step_s', 'step_s',
          'images_per_s', 'device_peak_gb', 'peak_rss_gb', 'wall_s')
  deadline = time.monotonic() + FLAGS.budget_s
  env, path = environment(), os.path.join(FLAGS.out, 'bench_gpu.json')
  benchmarking.report(env, cols, saved_as_they_come(run_rows(FLAGS.rows, deadline), env, path),
                      path)


def saved_as_they_come(rows, env: dict, path: str):
  """Rewrites ``path`` after each row, so that a run killed from outside
  leaves the rows it finished."""
  done = []
  for row in rows:
    done.append(row)
    with open(path, 'w') as f:
      json.dump({'environment': env, 'results': done}, f, indent=1)
    yield row


if __name__ == '__main__':
  app.run(main)
