"""Benchmarks the CPU backend's pieces one at a time: the figures that
docs/cpu_backend.md gives as the reason for each.

  python experiments/bench_cpu_ops.py                        # the paper's search geometry
  python experiments/bench_cpu_ops.py --sections=dilconv,pool --kernel_sizes=3,5

Rows are forward + backward passes: jax.value_and_grad of <output, a fixed
random cotangent> with respect to the parameters and inputs, BN statistics
updated, jitted; the median of --steps after --warmup. The input is one edge
batch's: S sources [S,N,H,W,C] feeding G = fan_out·S edges (a cell's first
batch: 2 sources, 4 nodes, G = 8).

  bandwidth  a·x + b over an array of the edge batch's output size, into a new
             buffer and in place: GB/s moved (reads + writes)
  depthwise  KxK depthwise conv at each (stride, dilation) the search uses:
             'reference' (snas_jax/layers.py's grouped convolution, one per edge
             under nn.vmap, as the reference network runs an edge batch), the
             backend's 'shift' form with its custom VJP and with plain autodiff
             ('shift autodiff'), and its 'native' kernels
  dilconv    DilConv / half a SepConv in training (ReLU -> depthwise -> 1x1 ->
             BN without affine parameters): reference, shift, native
  pool       3x3 max and average pool -> BN without affine parameters:
             reference (per edge), the backend's forms (per source, then fanned out)
  cell       one normal search cell of the backend (C channels, inputs 4C)
             under each XLA:CPU scheduler in --schedulers (XLA_FLAGS is read at
             start-up: a scheduler other than this process's runs in its own
             process), and with `materialize` off (the identity instead)
  init       the search network's init as each backend draws it: 'reference'
             (jax.random draws in a jitted init) and 'cpu' (cut on the host
             from one NumPy stream); compile_s sums XLA's compiles inside it

Columns: compile_s (lower + compile), step_ms, kernels (fusions in the
optimised HLO, as bench_search.py counts them), calls (custom calls: the
native kernels), temp_mb (XLA's temporaries), faults (minor page faults per
step), gb_s, init_s. The process is set up as the entry scripts set it
(backends/cpu/process.py: the memory-optimised scheduler, memory tuning); the
native rows run where the kernels build. Prints a table, then one JSON object
per row (also to --json_out).
"""
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ['JAX_PLATFORMS'] = 'cpu'  # the figures are XLA:CPU's

from absl import app, flags  # noqa: E402

from experiments import benchmarking  # noqa: E402

SECTIONS = ('bandwidth', 'depthwise', 'dilconv', 'pool', 'cell', 'init')

flags.DEFINE_integer('batch_size', 64, 'N: images per batch.')
flags.DEFINE_integer('image_size', 32, 'H = W: the image side.')
flags.DEFINE_integer('channels', 16, 'C of the ops and of the cell.')
flags.DEFINE_integer('sources', 2, 'S: source states of the ops rows\' edge batch.')
flags.DEFINE_integer('fan_out', 4, 'Edges leaving each source (G = fan_out·S).')
flags.DEFINE_list('kernel_sizes', ['3'], 'K of the depthwise and DilConv rows (the search: 3, 5).')
# The search's depthwise convs: SepConv halves dilation 1, DilConvs 2; stride 2
# on a reduction cell's input edges.
flags.DEFINE_list('strides', ['1', '2'], 'Strides of the depthwise, DilConv and pool rows.')
flags.DEFINE_list('dilations', ['1', '2'], 'Dilations of the depthwise and DilConv rows.')
flags.DEFINE_list('sections', list(SECTIONS), f'Which to run, of {",".join(SECTIONS)}.')
flags.DEFINE_list('schedulers', ['MEMORY_OPTIMIZED', 'DEFAULT', 'CONCURRENCY_OPTIMIZED'],
                  'cell: XLA:CPU schedulers '
                  '(--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_<name>; DEFAULT is what XLA runs '
                  'without the flag).')
flags.DEFINE_enum('cell_impl', 'auto', ['auto', 'native', 'shift'], "cell: the backend's ops "
                  '(auto: native where the kernels build).')
flags.DEFINE_integer('layers', 8, 'init: cells of the search network.')
flags.DEFINE_bool('tune_memory', True, 'Run as the entry scripts do (their --tune_memory): '
                  "restart once with the block cache preloaded and glibc's tunables.")
flags.DEFINE_integer('steps', 5, 'Timed steps after warm-up (the median is reported).')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
flags.DEFINE_string('json_out', '', 'Also write the results here as a JSON list.')
flags.DEFINE_string('child', '', 'Internal: measure one cell row given as JSON and print it.')
FLAGS = flags.FLAGS

# What a child process needs to measure the same row.
_CHILD_FLAGS = ('batch_size', 'image_size', 'channels', 'cell_impl', 'tune_memory', 'steps',
                'warmup')
_SCHEDULER = re.compile(r'--xla_cpu_scheduler_type=(?:CPU_SCHEDULER_TYPE_)?(\w+)')
_COMPILE_S = [0.0]  # XLA compile seconds so far in this process


def configure() -> None:
  """The CPU backend's process settings, as the entry scripts apply them."""
  from snas_jax.backends.cpu import process
  process.configure(FLAGS.tune_memory, cpu_devices=0)
  import jax
  jax.config.update('jax_enable_compilation_cache', False)  # every compile is measured

  def count(event, duration_secs, **_):
    if event == '/jax/core/compile/backend_compile_duration':
      _COMPILE_S[0] += duration_secs

  jax.monitoring.register_event_duration_secs_listener(count)


def normal(*shape):
  import numpy as np
  return np.random.default_rng(len(shape)).normal(size=shape).astype(np.float32)


def sources_batch():
  n, size, c = FLAGS.batch_size, FLAGS.image_size, FLAGS.channels
  return normal(FLAGS.sources, n, size, size, c)


def measure(step, args, donate: bool = False, moved_bytes: int = 0) -> dict:
  """Compiles step(*args) and times it. ``donate``: in place, each output the
  next input; ``moved_bytes``: also the GB/s that moving them per step takes."""
  import jax
  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0 if donate else ()).lower(*args).compile()
  compile_s = time.perf_counter() - t
  times = []
  for i in range(FLAGS.warmup + FLAGS.steps):
    if i == FLAGS.warmup:
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
    args = (out,) if donate else args
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  hlo = compiled.as_text().splitlines()
  step_s = statistics.median(times[FLAGS.warmup:])
  return {'compile_s': round(compile_s, 3), 'step_ms': round(1e3 * step_s, 3),
          **({'gb_s': round(moved_bytes / step_s / 1e9, 2)} if moved_bytes else {}),
          'kernels': benchmarking.fused_kernels(compiled),
          'calls': sum(' custom-call(' in line for line in hlo),
          'temp_mb': round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
          'faults': round(faults / FLAGS.steps)}


def train_step(apply, params, inputs):
  """(step, args) for (y, updates) = apply(params, inputs): the value and
  gradients of <y, ct> w.r.t. params and inputs, and the updates (BN
  statistics), as a train step computes them."""
  import jax
  import jax.numpy as jnp
  ct = normal(*jax.eval_shape(apply, params, inputs)[0].shape)

  def step(params, inputs, ct):
    def loss(params, inputs):
      y, updates = apply(params, inputs)
      return jnp.vdot(y, ct), updates
    return jax.value_and_grad(loss, (0, 1), has_aux=True)(params, inputs)

  return step, (params, inputs, ct)


def module_step(module, *inputs, **kwargs):
  """``train_step`` of a Flax module called on ``inputs`` in training; its
  variables random normal (their values do not change the work, and a real
  init would compile the forward pass once more)."""
  import jax
  shapes = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **kwargs), *inputs)
  variables = jax.tree.map(lambda s: 0.1 * normal(*s.shape), shapes)
  state = {k: v for k, v in variables.items() if k != 'params'}

  def apply(params, inputs):
    return module.apply({'params': params, **state}, *inputs, mutable=list(state), **kwargs)

  return train_step(apply, variables.get('params', {}), inputs)


def reference_edges(op, train=None):
  """The reference's op run on an edge batch as its search network does: the
  sources stacked once per destination, one op per edge (nn.vmap)."""
  import jax.numpy as jnp
  from flax import linen as nn

  class Edges(nn.Module):
    op: nn.Module

    @nn.compact
    def __call__(self, x):
      run = lambda op, x: op(x) if train is None else op(x, train)
      edges = nn.vmap(run, variable_axes={'params': 0, 'batch_stats': 0},
                      split_rngs={'params': True})
      return edges(self.op, jnp.concatenate([x] * FLAGS.fan_out))  # edge g reads source g % S

  return Edges(op)


def geometries() -> list:
  return [(int(s), int(d)) for s in FLAGS.strides for d in FLAGS.dilations]


def impls(*xla_forms) -> tuple:
  """The backend's forms to measure: ``xla_forms``, and 'native' where the kernels build."""
  from snas_jax.backends.cpu import native
  return xla_forms + (('native',) if native.available() else ())


def bandwidth_rows():
  import jax.numpy as jnp
  x = normal(FLAGS.fan_out * FLAGS.sources, FLAGS.batch_size, FLAGS.image_size,
             FLAGS.image_size, FLAGS.channels)
  for variant, donate in (('new buffer', False), ('in place', True)):
    yield {'op': 'a*x + b', 'variant': variant, 'shape': list(x.shape),
           **measure(lambda x: 0.5 * x + 0.25, (jnp.asarray(x),), donate, 2 * x.nbytes)}


def depthwise_rows():
  from snas_jax import layers
  from snas_jax.backends.cpu import ops
  x, c = sources_batch(), FLAGS.channels
  for k in map(int, FLAGS.kernel_sizes):
    kernel = 0.1 * normal(k, k, FLAGS.fan_out * FLAGS.sources, c)
    for stride, dilation in geometries():
      op = f'depthwise {k}x{k} s{stride} d{dilation}'
      yield {'op': op, 'variant': 'reference', **measure(*module_step(reference_edges(
          layers.conv(c, k, stride, dilation=dilation, groups=c)), x))}
      for variant in impls('shift', 'shift autodiff'):
        def apply(kernel, inputs, impl=variant.split()[0]):
          return ops.depthwise_conv(inputs[0], kernel, stride=stride, dilation=dilation,
                                    impl=impl), {}
        # Plain autodiff of the same forward pass: its custom VJP's primal function.
        autodiff = (mock.patch.object(ops, '_depthwise_shift', ops._depthwise_shift.fun)
                    if variant.endswith('autodiff') else contextlib.nullcontext())
        with autodiff:
          row = measure(*train_step(apply, kernel, (x,)))
        yield {'op': op, 'variant': variant, **row}


def dilconv_rows():
  from snas_jax.spaces.darts import ops as reference
  from snas_jax.backends.cpu import ops
  x, c = sources_batch(), FLAGS.channels
  for k in map(int, FLAGS.kernel_sizes):
    for stride, dilation in geometries():
      op = f'DilConv {k}x{k} s{stride} d{dilation}'
      yield {'op': op, 'variant': 'reference', **measure(*module_step(reference_edges(
          reference.DilConv(c, k, stride, dilation, affine=False), train=True), x))}
      for impl in impls('shift'):
        module = ops.DilConv(c, k, stride, dilation, FLAGS.fan_out, affine=False, impl=impl)
        yield {'op': op, 'variant': impl, **measure(*module_step(module, x, train=True))}


def pool_rows():
  from snas_jax.spaces.darts import ops as reference
  from snas_jax.backends.cpu import ops
  x = sources_batch()
  for kind in ('max', 'avg'):
    for stride in map(int, FLAGS.strides):
      op = f'{kind} pool 3x3 s{stride} + BN'
      yield {'op': op, 'variant': 'reference', **measure(*module_step(reference_edges(
          reference.Pool(kind, stride, affine=False), train=True), x))}
      for impl in impls('shift'):
        module = ops.Pool(kind, stride, FLAGS.fan_out, affine=False, impl=impl)
        yield {'op': op, 'variant': impl, **measure(*module_step(module, x, train=True))}


def current_scheduler() -> str:
  found = _SCHEDULER.search(os.environ.get('XLA_FLAGS', ''))
  return found.group(1) if found else 'DEFAULT'


def cell_specs() -> list:
  from snas_jax.backends import cpu
  impl = cpu.default_impl() if FLAGS.cell_impl == 'auto' else FLAGS.cell_impl
  specs = [{'scheduler': s, 'materialize': True} for s in FLAGS.schedulers]
  specs.append({'scheduler': current_scheduler(), 'materialize': False})
  return [{'op': 'normal search cell', 'variant': f'{impl}, {s["scheduler"]} scheduler' + (
      '' if s['materialize'] else ', materialize off'), 'impl': impl, **s} for s in specs]


def measure_cell(spec: dict) -> dict:
  import jax
  from snas_jax.spaces.darts import search_model
  from snas_jax.backends.cpu import forms, ops
  n, size, c = FLAGS.batch_size, FLAGS.image_size, FLAGS.channels
  cell = search_model.SearchCell(c, reduction=False, reduction_prev=False, train=True,
                                 forms=forms.forms(spec['impl']))
  z = jax.nn.softmax(normal(14, 8))
  off = [] if spec['materialize'] else [
      mock.patch.object(ops, 'materialize', lambda x, after=None: x),
      mock.patch.object(ops, 'materialize_grad', lambda x: x)]
  with contextlib.ExitStack() as stack:
    for patch in off:
      stack.enter_context(patch)
    s0 = normal(n, size, size, 4 * c)
    return {**spec, 'shape': list(s0.shape), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
            **measure(*module_step(cell, s0, s0 + 1.0, z))}


def run_child(spec: dict) -> dict:
  """``spec`` measured in a new process whose XLA_FLAGS name its scheduler."""
  xla_flags = _SCHEDULER.sub('', os.environ.get('XLA_FLAGS', ''))
  env = dict(os.environ, XLA_FLAGS=f'{xla_flags} --xla_cpu_scheduler_type='
             f'CPU_SCHEDULER_TYPE_{spec["scheduler"]}'.strip())
  argv = [sys.executable, os.path.abspath(__file__), f'--child={json.dumps(spec)}',
          *(f'--{name}={getattr(FLAGS, name)}' for name in _CHILD_FLAGS)]
  proc = subprocess.run(argv, capture_output=True, text=True, env=env)
  lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    return {**spec, 'error': f'exit {proc.returncode}: {tail[:200]}'}
  return json.loads(lines[-1])


def cell_rows():
  for spec in cell_specs():
    yield measure_cell(spec) if spec['scheduler'] == current_scheduler() else run_child(spec)


def init_rows():
  import jax
  from snas_jax import backends, search
  cfg = search.SearchConfig(channels=FLAGS.channels, layers=FLAGS.layers,
                            image_size=FLAGS.image_size)
  net = search.make_network(cfg)
  for name in ('reference', 'cpu'):
    backend = backends.get(name)  # cpu: builds the kernels (before the clock)
    compiled_before, t = _COMPILE_S[0], time.perf_counter()
    variables = jax.block_until_ready(
        search.init_variables(cfg, net, (FLAGS.image_size,) * 2 + (3,), backend))
    yield {'op': f'search network, {FLAGS.layers} cells', 'variant': name,
           'init_s': round(time.perf_counter() - t, 2),
           'compile_s': round(_COMPILE_S[0] - compiled_before, 2),
           'params': len(jax.tree.leaves(variables['params']))}


def environment() -> dict:
  import jax
  from snas_jax.backends.cpu import native, process
  return {'machine': benchmarking.machine(), 'jax': jax.__version__,
          'python': platform.python_version(), 'memory': process.memory_tuning(),
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'native': native.fallback_reason() or 'built', 'command': ' '.join(sys.argv),
          **{name: getattr(FLAGS, name) for name in ('batch_size', 'image_size', 'channels',
                                                     'sources', 'fan_out', 'steps', 'warmup')}}


def main(argv):
  del argv
  unknown = set(FLAGS.sections) - set(SECTIONS)
  if unknown:
    raise SystemExit(f'error: unknown section(s) {",".join(sorted(unknown))}; '
                     f'use {",".join(SECTIONS)}')
  configure()
  if FLAGS.child:
    print(json.dumps(measure_cell(json.loads(FLAGS.child))), flush=True)
    return
  cols = ('section', 'op', 'variant', 'compile_s', 'step_ms', 'kernels', 'calls', 'temp_mb',
          'faults', 'gb_s', 'init_s')
  rows = ({'section': section, **r} for section in SECTIONS if section in FLAGS.sections
          for r in globals()[f'{section}_rows']())
  benchmarking.report(environment(), cols, rows, FLAGS.json_out)


if __name__ == '__main__':
  app.run(main)
