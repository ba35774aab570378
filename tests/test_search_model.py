"""Tests for snas_jax.spaces.darts.search_model: the reference search network (docs/algorithm.md §1).

Cost note: search-cell graphs take long to compile on XLA:CPU, so these tests
use eval_shape wherever shapes or parameter counts suffice, build variables
from eval_shape with numpy, and compile each network function once per module.
"""
import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snas_jax import layers, sampling
from snas_jax.spaces.darts import genotypes
from snas_jax.spaces.darts import search_model as sm
from snas_jax.spaces.darts.genotypes import EDGES, NUM_EDGES, NUM_OPS, PRIMITIVES

N, HW, C = 4, 8, 4
TINY = dict(c=C, layers=2, num_classes=10)  # reductions at L//3 = 0 and 2L//3 = 1
UNIFORM = jnp.full((NUM_EDGES, NUM_OPS), 1 / NUM_OPS, jnp.float32)


def _none_z():
  return jnp.asarray(genotypes.cell_to_one_hot(((), (), (), ())))


def _variables(shapes, seed):
  """Random params in the module's layout; fresh BN statistics (mean 0, var 1)."""
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
      lambda s: rng.uniform(-0.5, 0.5, s.shape).astype(np.float32), shapes['params'])
  stats = jax.tree_util.tree_map_with_path(
      lambda p, s: np.full(s.shape, 1.0 if p[-1].key == 'var' else 0.0, np.float32),
      shapes['batch_stats'])
  return {'params': params, 'batch_stats': stats}


def _images(seed, n=N):
  return np.random.default_rng(seed).normal(size=(n, HW, HW, 3)).astype(np.float32)


def _is_cell(module, _):
  return isinstance(module, sm.SearchCell)


def _cell_outputs(state):
  inter = state['intermediates']
  return {name: np.asarray(inter[name]['__call__'][0]) for name in sorted(inter)}


@pytest.fixture(scope='module')
def tiny():
  """The tiny network, its variables, and jitted train / eval forward passes
  that also return the cell outputs."""
  net = sm.SearchNetwork(**TINY)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), _images(0), {'normal': UNIFORM, 'reduce': UNIFORM}, True))
  variables = _variables(shapes, 1)

  def forward(train):
    return jax.jit(lambda v, x, zn, zr: net.apply(
        v, x, {'normal': zn, 'reduce': zr}, train, mutable=['batch_stats', 'intermediates'],
        capture_intermediates=_is_cell))

  return net, variables, forward(True), forward(False)


# ----------------------------------------------------------------------------
# Structure (no compiles).


def test_edge_batches_cover_every_edge_once():
  batches = genotypes.edge_batches()
  rows = [r for _, _, rs in batches for r in rs]
  assert sorted(rows) == list(range(NUM_EDGES))
  for b, (sources, dests, rs) in enumerate(batches):
    s = len(sources)
    assert len(rs) == len(dests) * s
    for g, row in enumerate(rs):  # edge g reads sources[g % S], feeds dests[g // S]
      node, state = EDGES[row]
      assert (node, state) == (dests[g // s], sources[g % s])
      # Its source exists when the batch runs: the inputs in batch 0, node
      # i (state i + 2) in batch i + 1, right after its last input edge.
      assert b == (0 if state < 2 else state - 1)
      assert b <= node  # node `node` is complete after batch `node`
  assert batches[0][:2] == ((0, 1), (0, 1, 2, 3))
  assert [bt[0] for bt in batches[1:]] == [(2,), (3,), (4,)]


def test_paper_search_network_parameter_count_and_shapes():
  """docs/algorithm.md §1: C = 16, L = 8, 32x32, 10 classes: 1,930,618 parameters; cells
  2 and 5 reduce (halve H x W, double C); every cell outputs 4·C_cell."""
  net = sm.SearchNetwork(c=16, layers=8, num_classes=10)
  logits, shapes = jax.eval_shape(lambda: net.init_with_output(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), {'normal': UNIFORM, 'reduce': UNIFORM}, True,
      capture_intermediates=_is_cell))
  assert sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(shapes['params'])) == 1_930_618
  # BN running statistics exist (not counted): non-affine cell BNs keep them.
  assert len(jax.tree_util.tree_leaves(shapes['batch_stats'])) > 0
  assert logits.shape == (1, 10)
  cells = [shapes['intermediates'][f'cell_{i}']['__call__'][0].shape[1:] for i in range(8)]
  assert cells == [(32, 32, 64)] * 2 + [(16, 16, 128)] * 3 + [(8, 8, 256)] * 3


def test_wrong_z_shape_raises():
  net = sm.SearchNetwork(**TINY)
  with pytest.raises(ValueError, match=r"z\['reduce'\] must be \[14, 8\] in the darts space, got \[14, 7\]"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((N, HW, HW, 3)),
                                    {'normal': UNIFORM, 'reduce': jnp.zeros((14, 7))}, True))


@pytest.mark.parametrize('train', [True, False])
def test_all_none_z_gives_zero_cells_and_bias_logits(tiny, train):
  net, variables, train_fn, eval_fn = tiny
  fn = train_fn if train else eval_fn
  bias = variables['params']['classifier']['bias']
  assert np.max(np.abs(bias)) > 0.05  # a non-trivial bias to find
  for seed in (10, 11):  # any input
    logits, state = fn(variables, _images(seed), _none_z(), _none_z())
    outs = _cell_outputs(state)
    # Both cells of L = 2 reduce: 8x8 -> 4x4 (4·8 ch.) -> 2x2 (4·16 ch.).
    assert [o.shape for o in outs.values()] == [(N, 4, 4, 32), (N, 2, 2, 64)]
    for name, out in outs.items():
      assert np.all(out == 0), name
    np.testing.assert_array_equal(np.asarray(logits), np.broadcast_to(bias, (N, 10)))


def test_soft_softmax_and_one_hot_z_give_finite_distinct_logits(tiny):
  net, variables, train_fn, eval_fn = tiny
  rng = np.random.default_rng(3)
  alpha = jnp.asarray(rng.normal(1.0, 0.01, (2, NUM_EDGES, NUM_OPS)), jnp.float32)  # docs/algorithm.md §2 init
  noise = jnp.asarray(-np.log(-np.log(rng.uniform(size=(2, NUM_EDGES, NUM_OPS)))), jnp.float32)
  zs = {
      'gumbel_soft': [sampling.relaxed_sample(alpha[i], noise[i], 1.0) for i in range(2)],
      'softmax': [jax.nn.softmax(alpha[i]) for i in range(2)],
      'one_hot': [jnp.asarray(genotypes.cell_to_one_hot(c))
                  for c in (genotypes.SNAS_MILD.normal, genotypes.SNAS_MILD.reduce)],
  }
  x = _images(12)
  results = {}
  for kind, (zn, zr) in zs.items():
    for fn in (train_fn, eval_fn):
      logits, _ = fn(variables, x, zn, zr)
      logits = np.asarray(logits)
      assert logits.shape == (N, 10) and np.all(np.isfinite(logits)), kind
    results[kind] = logits
    assert np.std(logits, axis=0).max() > 1e-3  # depends on the input
  bias = np.asarray(variables['params']['classifier']['bias'])
  for a, b in [('gumbel_soft', 'softmax'), ('softmax', 'one_hot'), ('gumbel_soft', 'one_hot')]:
    assert np.abs(results[a] - results[b]).max() > 1e-4, (a, b)
  assert np.abs(results['one_hot'] - bias).max() > 1e-3


def test_batch_statistics_update_in_train_mode_only(tiny):
  net, variables, train_fn, eval_fn = tiny
  x = _images(13)
  _, new = train_fn(variables, x, UNIFORM, UNIFORM)
  old_leaves = jax.tree_util.tree_leaves(variables['batch_stats'])
  new_leaves = jax.tree_util.tree_leaves_with_path(new['batch_stats'])
  assert len(old_leaves) == len(new_leaves) > 10
  # Every BN's statistics move (mean or variance: a running mean may stay 0,
  # e.g. an avg pool over a 2x2 map of BN-normalised, zero-mean ops).
  changed = collections.defaultdict(bool)
  for a, (path, b) in zip(old_leaves, new_leaves):
    changed[jax.tree_util.keystr(path[:-1])] |= not np.allclose(a, b)
  assert all(changed.values()), [k for k, c in changed.items() if not c]
  var_changed = [not np.allclose(a, b) for a, (p, b) in zip(old_leaves, new_leaves)
                 if p[-1].key == 'var']
  assert all(var_changed) and len(var_changed) == len(changed)
  # PyTorch's momentum 0.1: stem running mean = 0.1 · batch mean of the stem
  # conv (3x3, pad 1, no bias), computed here in numpy; running variance
  # 0.9 + 0.1 · the unbiased batch variance (n = N·H·W values per channel).
  k = variables['params']['stem_conv']['kernel']  # [3, 3, 3, 3C]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(np.einsum('nhwc,cf->nhwf', xp[:, i:i + HW, j:j + HW], k[i, j])
             for i in range(3) for j in range(3))
  np.testing.assert_allclose(np.asarray(new['batch_stats']['stem_bn']['mean']),
                             0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  n = conv.size // conv.shape[-1]
  np.testing.assert_allclose(np.asarray(new['batch_stats']['stem_bn']['var']),
                             0.9 + 0.1 * conv.reshape(n, -1).var(0, ddof=1), rtol=1e-4)
  # Eval mode: statistics untouched, and samples do not interact.
  logits, same = eval_fn(variables, x, UNIFORM, UNIFORM)
  for a, b in zip(old_leaves, jax.tree_util.tree_leaves(same['batch_stats'])):
    np.testing.assert_array_equal(a, b)
  x2 = x.copy()
  x2[1:] = _images(14)[1:]
  logits2, _ = eval_fn(variables, x2, UNIFORM, UNIFORM)
  np.testing.assert_allclose(np.asarray(logits2)[0], np.asarray(logits)[0], rtol=1e-5, atol=1e-6)
  # ... whereas in train mode the batch statistics couple them.
  t1, _ = train_fn(variables, x, UNIFORM, UNIFORM)
  t2, _ = train_fn(variables, x2, UNIFORM, UNIFORM)
  assert np.abs(np.asarray(t1)[0] - np.asarray(t2)[0]).max() > 1e-4


# ----------------------------------------------------------------------------
# One cell: routing through skip connections.


def _relu_conv_bn(s, kernel):
  """Numpy ReLU -> 1x1 conv -> train-mode non-affine BN (biased variance)."""
  y = np.einsum('nhwc,cf->nhwf', np.maximum(s, 0), kernel)
  return (y - y.mean((0, 1, 2))) / np.sqrt(y.var((0, 1, 2)) + layers.BN_EPSILON)


def test_skip_connections_route_the_preprocessed_inputs():
  """A normal cell with Z one-hot on skip_connect along
     node 0 <- s1, node 1 <- node 0, node 2 <- s0 + node 1, node 3 <- s1 + node 2
  and `none` elsewhere outputs [P1, P1, P0 + P1, P0 + 2·P1] with P0, P1 the
  preprocessed inputs (ReLU-1x1-BN, computed in numpy)."""
  skip = PRIMITIVES.index('skip_connect')
  z = np.array(_none_z())
  for edge in [(0, 1), (1, 2), (2, 0), (2, 3), (3, 1), (3, 4)]:
    z[EDGES.index(edge)] = np.eye(NUM_OPS)[skip]
  rng = np.random.default_rng(5)
  s0, s1 = (rng.normal(size=(N, HW, HW, 6)).astype(np.float32) for _ in range(2))
  cell = sm.SearchCell(C, reduction=False, reduction_prev=False, train=True)
  shapes = jax.eval_shape(lambda: cell.init(jax.random.key(0), s0, s1, UNIFORM))
  variables = _variables(shapes, 6)
  out, _ = jax.jit(lambda v, a, b, z: cell.apply(v, a, b, z, mutable=['batch_stats']))(
      variables, s0, s1, jnp.asarray(z))
  out = np.asarray(out)
  kernel = lambda name: variables['params'][name]['conv']['kernel'][0, 0]  # [6, C]
  p0, p1 = _relu_conv_bn(s0, kernel('preprocess0')), _relu_conv_bn(s1, kernel('preprocess1'))
  want = np.concatenate([p1, p1, p0 + p1, p0 + 2 * p1], axis=-1)
  assert out.shape == (N, HW, HW, 4 * C)
  # float32 BN of 256 values per channel vs float64: 1e-4 absolute on O(1).
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  assert np.abs(p0).max() > 0.5 and np.abs(p1 - p0).max() > 0.5  # not trivially equal
