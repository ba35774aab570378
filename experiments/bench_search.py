"""Benchmarks the search step: init, trace + compile, steady-state speed, memory.

  python experiments/bench_search.py                      # the paper's config (+ remat)
  python experiments/bench_search.py --backend=reference  # what a GPU/TPU runs
  python experiments/bench_search.py --sweep=batch,channels,cells,devices
  python experiments/bench_search.py --backend=reference --dtype=bfloat16  # mixed precision
  python experiments/bench_search.py --backend=reference --steps=0 --warmup=0  # start-up only
  python experiments/bench_search.py --space=nb201 --layers=5   # NAS-Bench-201's supernet

Each configuration runs in its own process (so peak memory is its own and a
device count can be forced), on synthetic 32x32 images, with every op of the
real step: Gumbel samples, forward, backward, w and α updates, BN statistics.
The base configuration runs twice: cold, filling a fresh persistent
compilation cache, then warm, reading it (what a resumed run pays).
Prints a table and one JSON object per configuration (also to --json_out).
"""
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments import benchmarking  # noqa: E402

flags.DEFINE_integer('batch_size', 64, 'Global batch of the base configuration.')
flags.DEFINE_integer('channels', 16, 'C of the base configuration.')
flags.DEFINE_enum('space', 'darts', ['darts', 'nb201'], 'Search space (nb201: --layers is N, '
                  'the cells per stage; NB201\'s search protocol is --layers=5).')
flags.DEFINE_integer('layers', 8, 'Cells of the base configuration.')
flags.DEFINE_integer('image_size', 32, 'Image side of the base configuration (quick.flags: 16).')
flags.DEFINE_string('sweep', '', 'Comma-separated sweeps beyond the base config and its remat '
                    'variant: batch, channels, cells, devices (values: --sweep_<name>).')
flags.DEFINE_list('sweep_batch', ['16', '32', '128', '256'], 'Global batches of the batch sweep.')
flags.DEFINE_list('sweep_channels', ['8', '32'], 'C values of the channels sweep.')
flags.DEFINE_list('sweep_cells', ['5', '14', '20'], 'Cell counts of the cells sweep.')
flags.DEFINE_list('sweep_devices', ['1', '2', '4'], 'CPU device counts of the devices sweep '
                  '(XLA_FLAGS=--xla_force_host_platform_device_count; the base configuration '
                  'runs on the entry scripts\' count, --cpu_devices=0; on accelerators: '
                  'leave out, every device is used).')
flags.DEFINE_bool('remat_variant', True, 'Also measure the base configuration with --remat.')
flags.DEFINE_bool('cache_variant', True, 'Measure the base configuration a second time in a new '
                  'process with the persistent compilation cache its first run filled (what a '
                  'resumed or repeated run pays).')
flags.DEFINE_enum('backend', 'auto', ['auto', 'reference', 'cpu'], 'Backend to measure '
                  '(auto: cpu on a CPU-only host in float32, reference elsewhere).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'What the network computes in '
                  '(--dtype of the search; bfloat16 runs on the reference backend).')
flags.DEFINE_bool('tune_memory', True, 'CPU backend: run each configuration as the entry scripts '
                  "do (their --tune_memory): XLA's temporaries kept mapped, on transparent huge "
                  "pages, glibc's freed heap kept.")
flags.DEFINE_integer('steps', 5, 'Timed steps after warm-up (the median is reported); 0: init, '
                     'trace and compile only.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
flags.DEFINE_string('json_out', '', 'Also write the results here as a JSON list.')
flags.DEFINE_string('child', '', 'Internal: run one configuration given as JSON and print it.')
FLAGS = flags.FLAGS

SWEEPS = {'batch': 'batch_size', 'channels': 'channels', 'cells': 'layers', 'devices': 'devices'}


def measure(spec: dict) -> dict:
  """One configuration, in this process."""
  from snas_jax import backends, cli
  devices = spec['devices'] if spec['devices'] > 1 else 0
  memory = 'off'
  if spec['backend'] == 'cpu':  # as the entry scripts start it (memory tuning: run_child's env)
    from snas_jax.backends.cpu import process
    process.configure(tune_memory=False, cpu_devices=devices)
    memory = process.memory_tuning()
  elif devices:
    os.environ['XLA_FLAGS'] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f'--xla_force_host_platform_device_count={devices}')
  cli.enable_compilation_cache(spec.get('cache_dir', ''))
  import jax
  import numpy as np
  from snas_jax import costs, parallel, search
  cfg = search.SearchConfig(space=spec.get('space', 'darts'), channels=spec['channels'],
                            layers=spec['layers'],
                            batch_size=spec['batch_size'], remat=spec['remat'],
                            backend=spec['backend'], dtype=spec.get('dtype', 'float32'),
                            resource_eta=1e-3, epochs=150)
  mesh = parallel.make_mesh()
  net, tx = search.make_network(cfg), search.make_optimizer(cfg, steps_per_epoch=100)
  size = spec['image_size']
  tables = costs.penalty_tables(cfg.channels, cfg.layers, size, space=cfg.space)
  t = time.perf_counter()
  backend = backends.get(spec['backend'])  # cpu: builds the C++ kernels, once per machine (cached)
  build_s = time.perf_counter() - t
  t = time.perf_counter()
  state = search.init_state(cfg, net, tx, (size, size, 3), parallel.replicated(mesh), backend)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t
  step = search.make_train_step(cfg, backend.bind(net), tx, tables, mesh)
  rng = np.random.default_rng(0)
  batch = parallel.to_global({'image': rng.normal(size=(cfg.batch_size, size, size, 3)).astype(np.float32),
                              'label': rng.integers(0, 10, cfg.batch_size).astype(np.int32)}, mesh)
  tau = np.float32(1.0)
  t = time.perf_counter()
  lowered = step.lower(state, batch, tau)
  trace_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  rss_compiled = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for i in range(FLAGS.warmup + FLAGS.steps):
    if i == FLAGS.warmup:
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    state, metrics = compiled(state, batch, tau)
    jax.block_until_ready(metrics)
    if i >= FLAGS.warmup:
      times.append(time.perf_counter() - t)
  steps = max(FLAGS.steps, 1)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
  step_s = statistics.median(times) if times else None  # --steps=0: start-up only
  return {**spec, 'devices': len(jax.devices()), 'ops': getattr(backend, 'impl', '-'),
          'memory': memory, 'device_kind': jax.devices()[0].device_kind,
          'build_s': round(build_s, 2), 'init_s': round(init_s, 2),
          'trace_s': round(trace_s, 2), 'compile_s': round(compile_s, 2),
          'step_s': round(step_s, 3) if step_s else '-',
          'images_per_s': round(cfg.batch_size / step_s, 2) if step_s else '-',
          'dtype': cfg.dtype, 'space': cfg.space,
          'page_faults_per_step': round(faults),
          'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
          'rss_compiled_gb': round(rss_compiled, 2),
          'xla_temp_gb': round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 2),
          'device_peak_gb': device_peak_gb(), 'kernels': benchmarking.fused_kernels(compiled)}


def device_peak_gb():
  """Peak memory the first device's allocator held (GPU/TPU), or '-' where
  the device keeps no such statistics (the CPU: see peak_rss_gb)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return round(peak / 2**30, 2) if peak else '-'


def environment() -> dict:
  import flax
  import jax
  import optax
  return {'machine': benchmarking.machine(), 'backend': jax.default_backend(),
          'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__,
          'flax': flax.__version__, 'optax': optax.__version__, 'python': platform.python_version()}


def default_devices(backend: str) -> int:
  """The devices the entry scripts run this space on (the CPU backend's
  --cpu_devices=0: process.default_devices), 1 elsewhere."""
  if backend != 'cpu':
    return 1
  from snas_jax.backends.cpu import process
  return process.default_devices(FLAGS.space, [FLAGS.batch_size])


def specs(cache_dir: str) -> list:
  backend = backend_name()
  base = {'batch_size': FLAGS.batch_size, 'channels': FLAGS.channels, 'layers': FLAGS.layers,
          'image_size': FLAGS.image_size,
          'remat': False, 'backend': backend, 'devices': default_devices(backend), 'cache': 'off',
          'dtype': FLAGS.dtype, 'space': FLAGS.space}
  out = [base]
  if FLAGS.cache_variant:  # a cold run that fills a fresh cache, then one that reads it
    out = [{**base, 'cache': 'cold', 'cache_dir': cache_dir},
           {**base, 'cache': 'warm', 'cache_dir': cache_dir}]
  out += [{**base, 'remat': True}] if FLAGS.remat_variant else []
  for name in filter(None, FLAGS.sweep.split(',')):
    if name not in SWEEPS:
      raise SystemExit(f'error: unknown sweep {name!r}; use {",".join(SWEEPS)}')
    values = [int(v) for v in getattr(FLAGS, f'sweep_{name}')]
    out += [{**base, SWEEPS[name]: v} for v in values]
  return out


def backend_name() -> str:
  from snas_jax import backends
  return backends.resolve(FLAGS.backend, dtype=FLAGS.dtype)


def run_child(spec: dict) -> dict:
  env = None
  if FLAGS.tune_memory and spec['backend'] == 'cpu':
    from snas_jax.backends.cpu import process
    env = process.memory_tuning_env()
  return benchmarking.run_json_process(
      [sys.executable, __file__, f'--child={json.dumps(spec)}', f'--steps={FLAGS.steps}',
       f'--warmup={FLAGS.warmup}'], spec, env=env)


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(measure(json.loads(FLAGS.child))), flush=True)
    return
  cols = ('space', 'batch_size', 'channels', 'layers', 'image_size', 'devices', 'backend', 'dtype', 'ops',
          'memory',
          'remat', 'cache', 'build_s', 'init_s',
          'trace_s', 'compile_s', 'step_s', 'images_per_s', 'page_faults_per_step',
          'rss_compiled_gb', 'peak_rss_gb', 'xla_temp_gb', 'device_peak_gb', 'kernels')
  with tempfile.TemporaryDirectory(prefix='bench_xla_cache_') as cache_dir:
    rows = ({k: v for k, v in run_child(spec).items() if k != 'cache_dir'}
            for spec in specs(cache_dir))
    benchmarking.report(environment(), cols, rows, FLAGS.json_out)


if __name__ == '__main__':
  app.run(main)
