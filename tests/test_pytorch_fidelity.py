"""The reference networks against PyTorch modules built as the authors' code
builds them, with identical weights: logits, loss, the gradient of every parameter, dL/dZ, the BN running
statistics after one training pass and the evaluation logits after it.

tests/data/pytorch_golden.npz holds PyTorch's numbers for a tiny search
network and a tiny CIFAR child with its auxiliary head
(experiments/pytorch_golden.py writes it from experiments/pytorch_reference.py);
the first test needs no torch. Drop-path is off on both sides (the child runs
its drop-path code at rate 0, an all-ones mask).
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, load_experiment
from snas_jax import train
from snas_jax.spaces.darts import genotypes
from snas_jax.spaces.darts.child_model import NetworkCIFAR
from snas_jax.spaces.darts.search_model import SearchNetwork


gen = load_experiment('pytorch_golden')  # imports torch only when it generates

# Elementwise |ours − PyTorch| ≤ atol + rtol·|PyTorch|. float32 rounds at
# ε = 1.2e-7, and the two frameworks sum the same terms in different orders:
# up to ~10³ per value here (a conv's weight gradient over N·H·W positions, a
# BN statistic over as many values), so values of order 1 differ by
# √10³·ε to 10³·ε, 4e-6 to 1e-4 at worst. Observed: ≤ 3.6e-6 on gradients,
# ≤ 1.4e-6 on logits and dL/dZ, ≤ 3.6e-7 on running statistics; the
# tolerances leave 4x or more. An element near zero (a gradient that
# cancels) is judged by atol, not by its relative error.
TOLERANCES = {  # quantity: (rtol, atol)
    'loss': (1e-5, 5e-6),
    'logits': (1e-5, 5e-6),
    'aux_logits': (1e-5, 5e-6),
    'grads': (1e-5, 1e-5),
    'grad_z_normal': (1e-5, 1e-5),
    'grad_z_reduce': (1e-5, 1e-5),
    'new_batch_stats': (1e-5, 2e-6),
    'eval_logits': (1e-5, 5e-6),
}
# Inputs and weights are drawn by NumPy from a seed: the same on every run.
INPUTS = ('image', 'label', 'z_normal', 'z_reduce', 'params', 'batch_stats')
# Compiling the two tiny networks is most of the test's time; on XLA:CPU
# these options cut it ~3x (neither alone does) and change no convention.
CPU_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


def _jit(fn):
  return jax.jit(fn, compiler_options=CPU_COMPILER_OPTIONS if jax.default_backend() == 'cpu'
                 else None)


def _numpy(tree):
  return jax.tree.map(np.asarray, tree)


@functools.cache
def _search_pass():
  cfg = gen.SEARCH
  net = SearchNetwork(c=cfg['c'], num_classes=gen.CLASSES, layers=cfg['layers'])

  def run(params, batch_stats, image, label, z_normal, z_reduce):
    with jax.default_matmul_precision('highest'):  # no TF32 on GPUs
      def loss_fn(params, z_normal, z_reduce):
        logits, new = net.apply({'params': params, 'batch_stats': batch_stats}, image,
                                {'normal': z_normal, 'reduce': z_reduce}, True, mutable=['batch_stats'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
        return loss, (logits, new['batch_stats'])

      (loss, (logits, new_stats)), (grads, gz_normal, gz_reduce) = jax.value_and_grad(
          loss_fn, (0, 1, 2), has_aux=True)(params, z_normal, z_reduce)
      eval_logits = net.apply({'params': params, 'batch_stats': new_stats}, image,
                              {'normal': z_normal, 'reduce': z_reduce}, False)
    return {'loss': loss, 'logits': logits, 'grads': grads, 'grad_z_normal': gz_normal,
            'grad_z_reduce': gz_reduce, 'new_batch_stats': new_stats,
            'eval_logits': eval_logits}

  return _jit(run)


@functools.cache
def _child_pass():
  cfg = gen.CHILD
  net = NetworkCIFAR(genotypes.published(cfg['genotype']), cfg['c'], cfg['layers'], gen.CLASSES,
                     auxiliary=True)
  no_drop = jnp.zeros(())

  def run(params, batch_stats, image, label):
    with jax.default_matmul_precision('highest'):
      def loss_fn(params):
        (logits, aux), new = net.apply({'params': params, 'batch_stats': batch_stats}, image,
                                       no_drop, True, mutable=['batch_stats'],
                                       rngs={'dropout': jax.random.key(0)})
        loss, _, _ = train.training_loss(logits, aux, label, aux_weight=cfg['aux_weight'],
                                         smoothing=0.0)
        return loss, (logits, aux, new['batch_stats'])

      (loss, (logits, aux, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      eval_logits, eval_aux = net.apply({'params': params, 'batch_stats': new_stats}, image,
                                        no_drop, False)
    assert eval_aux is None
    return {'loss': loss, 'logits': logits, 'aux_logits': aux, 'grads': grads,
            'new_batch_stats': new_stats, 'eval_logits': eval_logits}

  return _jit(run)


def ours(name: str, case: dict) -> dict:
  """This code's results on a case's inputs and weights."""
  if name == 'search':
    out = _search_pass()(case['params'], case['batch_stats'], case['image'], case['label'],
                         case['z_normal'], case['z_reduce'])
  else:
    out = _child_pass()(case['params'], case['batch_stats'], case['image'], case['label'])
  return _numpy(out)


def mismatches(got: dict, want: dict, tolerances: dict) -> list:
  """One line per array of ``want``'s quantities in ``tolerances`` that ``got``
  lacks, shapes otherwise or misses by more than the tolerance, and per array
  ``got`` has beyond them: every leaf is checked."""
  bad = []
  for quantity, (rtol, atol) in tolerances.items():
    if quantity not in want:
      continue
    got_leaves = gen.flatten({quantity: got.get(quantity, {})})
    want_leaves = gen.flatten({quantity: want[quantity]})
    bad += [f'{key}: not in the reference' for key in sorted(set(got_leaves) - set(want_leaves))]
    for key, b in want_leaves.items():
      if key not in got_leaves:
        bad.append(f'{key}: missing')
        continue
      a, b = np.asarray(got_leaves[key], np.float64), np.asarray(b, np.float64)
      if a.shape != b.shape:
        bad.append(f'{key}: shape {a.shape} instead of {b.shape}')
        continue
      diff = np.abs(a - b)
      if not np.all(diff <= atol + rtol * np.abs(b)):
        bad.append(f'{key}: max |diff| {diff.max():.3g} (max |value| {np.abs(b).max():.3g})')
  return bad


def _assert_agree(got, want, tolerances, what):
  bad = mismatches(got, want, tolerances)
  assert not bad, f'{what}: {len(bad)} arrays differ:\n' + '\n'.join(bad[:20])


@pytest.fixture(scope='module')
def golden():
  return gen.load()


@pytest.mark.parametrize('name', ['search', 'child'])
def test_matches_pytorch_golden(golden, name):
  case = golden[name]
  absent = {'aux_logits'} if name == 'search' else {'grad_z_normal', 'grad_z_reduce'}
  assert set(TOLERANCES) - absent <= set(case)
  assert len(gen.flatten(case['grads'])) == len(gen.flatten(case['params'])) > 50
  _assert_agree(ours(name, case), case, TOLERANCES, f'{name} network vs PyTorch (golden file)')


def test_matches_pytorch_now_and_golden_file_is_current(golden):
  pytest.importorskip('torch')
  fresh = gen.generate()
  for name, case in fresh.items():
    _assert_agree(ours(name, case), case, TOLERANCES, f'{name} network vs PyTorch')
    stale = mismatches(golden[name], case, {**TOLERANCES, **{k: (1e-7, 0.0) for k in INPUTS}})
    assert not stale, (f'{os.path.relpath(gen.GOLDEN, ROOT)} is not what '
                       f'experiments/pytorch_golden.py computes now; if the change is meant, '
                       f'rerun it:\n' + '\n'.join(stale[:20]))
