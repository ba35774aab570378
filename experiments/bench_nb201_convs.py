"""Times the convolutions of NAS-Bench-201's supernet step alone: the floor
under its search step on a CPU (docs/performance.md).

  python experiments/bench_nb201_convs.py                # C = 16, N = 5, batch 64, 32x32

A search cell of NB201 runs, per edge batch (the G = 3, 2, 1 edges leaving
nodes 0, 1, 2), one ReLU -> 3x3 conv and one ReLU -> 1x1 conv of C -> G·C
channels; three stages of N cells at (C, H), (2C, H/2), (4C, H/4). Each of
these 18 shapes is timed forward and backward (jax.grad / autograd of
<conv(ReLU(x)), a fixed random cotangent> with respect to x and the kernel,
the median of --steps after --warmup) and counted N times. Rows, each in its
own process:

  xla, one device   the whole batch on one XLA:CPU device (every core)
  xla, one core     batch / cores images on one core: one device's share
                    when the CPU is split into a device per core
                    (--cpu_devices, backends/cpu/process.py)
  pytorch           the whole batch, torch.set_num_threads(cores), where
                    torch is installed

Columns: images, cores, conv_ms (the N·18 shapes forward + backward),
gflop (their multiply-adds x 2, forward + both gradients = 3x the forward),
gflop_s, and matmul_gflop_s: a 2048x2048 float32 matmul in the same process
on the same cores (the FMA units' practical peak). Prints a table, then one
JSON object per row (also to --json_out).
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import app, flags  # noqa: E402

from experiments import benchmarking  # noqa: E402

flags.DEFINE_integer('batch_size', 64, 'Images per step (the one-core row: batch / cores).')
flags.DEFINE_integer('channels', 16, 'C: the first stage\'s channels.')
flags.DEFINE_integer('layers', 5, 'N: cells per stage.')
flags.DEFINE_integer('image_size', 32, 'H = W of the first stage.')
flags.DEFINE_integer('steps', 10, 'Timed runs of each shape after warm-up (median).')
flags.DEFINE_integer('warmup', 2, 'Untimed runs of each shape.')
flags.DEFINE_string('json_out', '', 'Also write the results here as a JSON list.')
flags.DEFINE_string('child', '', 'Internal: measure one row given as JSON and print it.')
FLAGS = flags.FLAGS

def shapes() -> list:
  """(H, C, G, K) of every cell convolution of one cell per stage: the space's
  edge batches (G edges leaving a node) times its conv ops (kernel K)."""
  from snas_jax.spaces import nb201
  fan_outs = [len(dests) for _, dests, _ in nb201.EDGE_BATCHES]
  return [(FLAGS.image_size >> s, FLAGS.channels << s, g, k)
          for s in range(3) for g in fan_outs for k in nb201.CONV_KERNELS.values()]


def flops(images: int) -> float:
  """Forward + both gradients of the N·18 convolutions: 3 x 2 x multiply-adds."""
  return 3 * 2 * FLAGS.layers * sum(images * h * h * k * k * c * g * c
                                    for h, c, g, k in shapes())


def median_s(run) -> float:
  for _ in range(FLAGS.warmup):
    run()
  times = []
  for _ in range(FLAGS.steps):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def data(rng, images, h, c, g, k):
  return (rng.normal(size=(images, h, h, c)).astype('float32'),
          (0.1 * rng.normal(size=(k, k, c, g * c))).astype('float32'),
          rng.normal(size=(images, h, h, g * c)).astype('float32'))


def xla_row(images: int) -> tuple:
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)

  def loss(x, w, ct):
    y = jax.lax.conv_general_dilated(jax.nn.relu(x), w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.vdot(y, ct)

  grad = jax.jit(jax.grad(loss, (0, 1)))
  total = 0.0
  for h, c, g, k in shapes():
    args = [jnp.asarray(a) for a in data(rng, images, h, c, g, k)]
    total += FLAGS.layers * median_s(lambda: jax.block_until_ready(grad(*args)))
  a = jnp.asarray(rng.normal(size=(2048, 2048)).astype('float32'))
  matmul = jax.jit(lambda a: a @ a)
  return total, 2 * 2048 ** 3 / median_s(lambda: jax.block_until_ready(matmul(a)))


def pytorch_row(images: int, cores: int) -> tuple:
  import numpy as np
  import torch
  torch.set_num_threads(cores)
  rng = np.random.default_rng(0)
  total = 0.0
  for h, c, g, k in shapes():
    x, w, ct = (torch.from_numpy(a) for a in data(rng, images, h, c, g, k))
    x, w, ct = x.permute(0, 3, 1, 2).contiguous(), w.permute(3, 2, 0, 1).contiguous(), \
        ct.permute(0, 3, 1, 2).contiguous()
    x.requires_grad_(True)
    w.requires_grad_(True)

    def run():
      y = torch.nn.functional.conv2d(torch.relu(x), w, padding=k // 2)
      torch.autograd.grad((y * ct).sum(), (x, w))

    total += FLAGS.layers * median_s(run)
  a = torch.randn(2048, 2048)
  return total, 2 * 2048 ** 3 / median_s(lambda: a @ a)


def measure(spec: dict) -> dict:
  if spec['variant'] == 'xla, one core':
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before XLA starts its threads
  conv_s, matmul = (pytorch_row(spec['images'], spec['cores']) if spec['variant'] == 'pytorch'
                    else xla_row(spec['images']))
  work = flops(spec['images'])
  return {**spec, 'conv_ms': round(1e3 * conv_s, 1), 'gflop': round(work / 1e9, 3),
          'gflop_s': round(work / conv_s / 1e9, 1), 'matmul_gflop_s': round(matmul / 1e9, 1)}


def specs() -> list:
  cores = len(os.sched_getaffinity(0))
  out = [{'variant': 'xla, one device', 'images': FLAGS.batch_size, 'cores': cores},
         {'variant': 'xla, one core', 'images': FLAGS.batch_size // cores, 'cores': 1}]
  try:
    import torch  # noqa: F401
    out.append({'variant': 'pytorch', 'images': FLAGS.batch_size, 'cores': cores})
  except ImportError:
    print('torch is not installed: no pytorch row', file=sys.stderr)
  return out


def run_child(spec: dict) -> dict:
  return benchmarking.run_json_process(
      [sys.executable, os.path.abspath(__file__), f'--child={json.dumps(spec)}',
       *(f'--{name}={getattr(FLAGS, name)}' for name in
         ('channels', 'layers', 'image_size', 'steps', 'warmup'))], spec)


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(measure(json.loads(FLAGS.child))), flush=True)
    return
  env = {'machine': benchmarking.machine(), 'command': ' '.join(sys.argv),
         **{name: getattr(FLAGS, name) for name in ('batch_size', 'channels', 'layers',
                                                    'image_size', 'steps', 'warmup')}}
  cols = ('variant', 'images', 'cores', 'conv_ms', 'gflop', 'gflop_s', 'matmul_gflop_s')
  benchmarking.report(env, cols, (run_child(spec) for spec in specs()), FLAGS.json_out)


if __name__ == '__main__':
  app.run(main)
