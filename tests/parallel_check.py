"""Runs a few search steps of a tiny network on synthetic data and saves the
result, so tests can compare 1 device, 4 fake devices and 2 processes.

  python tests/parallel_check.py OUT.npz [--devices=N] [--coordinator=H:P --num_processes=2 --process_id=I]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from snas_jax import costs, parallel, search  # noqa: E402

STEPS, GLOBAL_BATCH, IMAGE = 2, 8, 8
# One reduction cell and the compact lax ops: what is under test is the
# sharding of the step, and this keeps its compile short.
CONFIG = search.SearchConfig(channels=4, layers=1, batch_size=GLOBAL_BATCH, epochs=2, backend='reference',
                             resource_eta=1e-2, drop_path=0.2)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('out')
  parser.add_argument('--devices', type=int, default=0)
  parser.add_argument('--coordinator', default='')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  args = parser.parse_args()
  parallel.initialize_distributed(args.coordinator or None, args.num_processes, args.process_id)
  mesh = parallel.make_mesh(args.devices or None)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(STEPS, GLOBAL_BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=(STEPS, GLOBAL_BATCH)).astype(np.int32)
  net = search.make_network(CONFIG)
  tx = search.make_optimizer(CONFIG, steps_per_epoch=STEPS)
  tables = costs.penalty_tables(CONFIG.channels, CONFIG.layers, IMAGE)
  state = search.init_state(CONFIG, net, tx, (IMAGE, IMAGE, 3), parallel.replicated(mesh))
  step = search.make_train_step(CONFIG, net, tx, tables, mesh)
  local = GLOBAL_BATCH // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  losses = []
  for t in range(STEPS):
    batch = parallel.to_global({'image': images[t, rows], 'label': labels[t, rows]}, mesh)
    state, metrics = step(state, batch, np.float32(0.5))
    losses.append(float(metrics['loss']))
  flat = {'/'.join(str(k.key) for k in path): np.asarray(jax.device_get(v))
          for path, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  if jax.process_index() == 0:
    np.savez(args.out, losses=np.asarray(losses), devices=len(mesh.devices.flat), **flat)


if __name__ == '__main__':
  main()
