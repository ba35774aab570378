"""Tests for snas_jax.search_model: the search network of SPEC §1.

Cost note: on XLA:CPU search-cell graphs take long to compile (measured cold,
2 busy cores: a reduction cell's value_and_grad 22 s with 'lax', 63 s with
'shift'; a 2-cell network's ~55 s / ~130 s; a jitted init ~90 s, as it
compiles a random generator per parameter). So these tests use eval_shape
wherever shapes or parameter counts suffice, build variables from eval_shape
with numpy, compile each network function once per module (impl 'lax'), and
compare 'lax' with 'shift' on one edge batch (all ops, stride 2) plus a
trace-only check that the network passes ``impl`` to every op. The cell- and
network-level 'lax' vs 'shift' gradient tests run with SNAS_SLOW_TESTS=1.
"""
import collections
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import primitive_counts
from snas_jax import genotypes, ops, sampling
from snas_jax import search_model as sm
from snas_jax.genotypes import EDGES, NUM_EDGES, NUM_OPS, PRIMITIVES

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
  """The tiny network (impl 'lax': fastest to compile), its variables, and
  jitted train / eval forward passes that also return the cell outputs."""
  net = sm.SearchNetwork(**TINY, impl='lax')
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), _images(0), UNIFORM, UNIFORM, True))
  variables = _variables(shapes, 1)

  def forward(train):
    return jax.jit(lambda v, x, zn, zr: net.apply(
        v, x, zn, zr, train, mutable=['batch_stats', 'intermediates'],
        capture_intermediates=_is_cell))

  return net, variables, forward(True), forward(False)


# ----------------------------------------------------------------------------
# Structure (no compiles).


def test_edge_batches_cover_every_edge_once():
  batches = sm.edge_batches()
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
  """SPEC §1: C = 16, L = 8, 32x32, 10 classes: 1,930,618 parameters; cells
  2 and 5 reduce (halve H x W, double C); every cell outputs 4·C_cell."""
  net = sm.SearchNetwork(c=16, layers=8, num_classes=10)
  logits, shapes = jax.eval_shape(lambda: net.init_with_output(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), UNIFORM, UNIFORM, True,
      capture_intermediates=_is_cell))
  assert sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(shapes['params'])) == 1_930_618
  # BN running statistics exist (not counted): non-affine cell BNs keep them.
  assert len(jax.tree_util.tree_leaves(shapes['batch_stats'])) > 0
  assert logits.shape == (1, 10)
  cells = [shapes['intermediates'][f'cell_{i}']['__call__'][0].shape[1:] for i in range(8)]
  assert cells == [(32, 32, 64)] * 2 + [(16, 16, 128)] * 3 + [(8, 8, 256)] * 3


def test_wrong_z_shape_raises():
  net = sm.SearchNetwork(**TINY)
  with pytest.raises(ValueError, match=r'z_reduce must be \[14, 8\], got \[14, 7\]'):
    jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((N, HW, HW, 3)),
                                    UNIFORM, jnp.zeros((14, 7)), True))


def test_impl_reaches_every_op():
  """Trace only: with 'shift' the network has no grouped (depthwise) conv and
  no reduce_window max; with 'lax' no custom-VJP kernel (but the mixers and
  avg pools); and the counts match (each depthwise conv / max pool is one or
  the other)."""
  x = jnp.zeros((N, HW, HW, 3))
  counts = {}
  for impl in ('lax', 'shift', 'native'):
    net = sm.SearchNetwork(**TINY, impl=impl)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, UNIFORM, UNIFORM, True))
    jaxpr = jax.make_jaxpr(lambda v: net.apply(v, x, UNIFORM, UNIFORM, True,
                                               mutable=['batch_stats']))(shapes)
    counts[impl] = primitive_counts(jaxpr.jaxpr)
  lax_c, shift_c = counts['lax'], counts['shift']
  assert lax_c['conv_general_dilated_grouped'] > 0 and lax_c['reduce_window_max'] > 0
  # ops.mix_edges, the avg pool and materialize_grad (of the edge batch's input):
  # one each per edge batch, in both impls.
  mixers = 2 * 4 * 3
  assert lax_c['custom_vjp_call'] == mixers
  assert shift_c['conv_general_dilated_grouped'] == 0 and shift_c['reduce_window_max'] == 0
  # In training each shift depthwise conv sits inside a DilConv's relu_conv_bn
  # (2 custom VJPs); each max pool is one.
  assert shift_c['custom_vjp_call'] == mixers + (2 * lax_c['conv_general_dilated_grouped']
                                                 + lax_c['reduce_window_max'])
  # 2 cells x 4 edge batches x (sep3 2 + sep5 2 + dil3 1 + dil5 1) depthwise convs.
  assert lax_c['conv_general_dilated_grouped'] == 2 * 4 * 6
  assert lax_c['reduce_window_max'] == 2 * 4


def test_remat_recomputes_cells_on_lax_and_depthwise_convs_on_shift():
  """Trace only. remat on the 'lax' path wraps each cell in jax.checkpoint;
  on 'shift' (XLA:CPU) it reaches every DilConv instead, whose backward
  pass then recomputes the depthwise conv from a materialised input: one
  more dot per DilConv (1 cell x 4 edge batches x 6) and no checkpoint."""
  x = jnp.zeros((N, HW, HW, 3))
  one_cell = dict(TINY, layers=1)  # tracing only, but 4 traces: keep them small

  def grad_counts(impl, remat):
    net = sm.SearchNetwork(**one_cell, impl=impl, remat=remat)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, UNIFORM, UNIFORM, True))
    loss = lambda p, stats: net.apply({'params': p, 'batch_stats': stats}, x, UNIFORM,
                                      UNIFORM, True, mutable=['batch_stats'])[0].sum()
    return primitive_counts(jax.make_jaxpr(jax.grad(loss))(shapes['params'],
                                                             shapes['batch_stats']).jaxpr)

  checkpoints = lambda counts: sum(n for name, n in counts.items()
                                  if name.startswith(('remat', 'checkpoint')))
  assert checkpoints(grad_counts('lax', True)) > 0
  plain, remat = grad_counts('shift', False), grad_counts('shift', True)
  assert checkpoints(remat) == 0
  assert remat['dot_general'] - plain['dot_general'] == 1 * 4 * 6


# ----------------------------------------------------------------------------
# The tiny network, run (one train and one eval compile for all of these).


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
  alpha = jnp.asarray(rng.normal(1.0, 0.01, (2, NUM_EDGES, NUM_OPS)), jnp.float32)  # SPEC §2 init
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
  # Flax momentum 0.9 (PyTorch 0.1): stem running mean = 0.1 · batch mean of
  # the stem conv (3x3, pad 1, no bias), computed here in numpy.
  k = variables['params']['stem_conv']['kernel']  # [3, 3, 3, 3C]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(np.einsum('nhwc,cf->nhwf', xp[:, i:i + HW, j:j + HW], k[i, j])
             for i in range(3) for j in range(3))
  np.testing.assert_allclose(np.asarray(new['batch_stats']['stem_bn']['mean']),
                             0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
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
# One cell: routing through skip connections, and 'lax' vs 'shift'.


def _relu_conv_bn(s, kernel):
  """Numpy ReLU -> 1x1 conv -> train-mode non-affine BN (biased variance)."""
  y = np.einsum('nhwc,cf->nhwf', np.maximum(s, 0), kernel)
  return (y - y.mean((0, 1, 2))) / np.sqrt(y.var((0, 1, 2)) + ops.BN_EPSILON)


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
  cell = sm.SearchCell(C, reduction=False, reduction_prev=False, train=True, impl='lax')
  shapes = jax.eval_shape(lambda: cell.init(jax.random.key(0), s0, s1, UNIFORM))
  variables = _variables(shapes, 6)
  out, _ = jax.jit(lambda v, a, b, z: cell.apply(v, a, b, z, mutable=['batch_stats']))(
      variables, s0, s1, jnp.asarray(z))
  out = np.asarray(out)
  kernel = lambda name: variables['params'][name]['PointwiseConv_0']['kernel'][0]  # [6, C]
  p0, p1 = _relu_conv_bn(s0, kernel('preprocess0')), _relu_conv_bn(s1, kernel('preprocess1'))
  want = np.concatenate([p1, p1, p0 + p1, p0 + 2 * p1], axis=-1)
  assert out.shape == (N, HW, HW, 4 * C)
  # float32 BN of 256 values per channel vs float64: 1e-4 absolute on O(1).
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  assert np.abs(p0).max() > 0.5 and np.abs(p1 - p0).max() > 0.5  # not trivially equal


def _compare_grads(g_lax, g_shift, rel=1e-4):
  leaves_lax = jax.tree_util.tree_leaves_with_path(g_lax)
  leaves_shift = jax.tree_util.tree_leaves(g_shift)
  assert len(leaves_lax) == len(leaves_shift)
  for (path, a), b in zip(leaves_lax, leaves_shift):
    scale = np.abs(a).max()
    assert scale > 0, jax.tree_util.keystr(path)  # every leaf gets a gradient
    np.testing.assert_allclose(b, a, rtol=rel, atol=rel * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_lax_and_shift_mixed_edges_agree_in_loss_and_gradients():
  """The edge batch leaving a reduction cell's two inputs (S = 2 sources,
  fan_out 4: 8 stride-2 edges, all 7 ops, FactorizedReduce included) with a
  soft Z: loss, gradients w.r.t. parameters, Z and input, and the running
  statistics' update agree between impls, and with the shift path's remat
  (its convolutions recompute their depthwise outputs). (Stride 1 at module
  level: the slow cell test below; the kernels in both strides: test_ops.py;
  impl threading through the network: above.)

  Tolerance: the impls differ by float32 summation order (~1e-7 relative per
  op, test_ops.py); train-mode BN over 4·4·4 = 64 values per channel divides
  by small standard deviations and sep convs are 2 BNs deep, so allow 1e-5
  relative to each gradient leaf's largest entry (measured 6e-7)."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, N, HW, HW, C)).astype(np.float32)
  alpha = rng.normal(size=(8, NUM_OPS)).astype(np.float32)
  noise = -np.log(-np.log(rng.uniform(size=(8, NUM_OPS)))).astype(np.float32)
  z = np.asarray(sampling.relaxed_sample(alpha, noise, 1.0))
  weights = rng.normal(size=(4, N, HW // 2, HW // 2, C)).astype(np.float32)
  keep = np.ones((8, 1), np.float32)
  results = {}
  for impl, remat in (('lax', False), ('shift', False), ('shift', True), ('native', False),
                      ('native', True)):
    edges = sm.MixedEdges(C, stride=2, fan_out=4, train=True, impl=impl, remat=remat)
    if impl == 'lax':
      variables = _variables(jax.eval_shape(lambda: edges.init(jax.random.key(0), x, z, keep)), 8)
      # The zero op is never built: 7 op modules (the pools hold only BN
      # statistics), none of them for `none`.
      assert set(variables['batch_stats']) == set(PRIMITIVES[1:])
      assert set(variables['params']) == {'skip_connect', 'sep_conv_3x3', 'sep_conv_5x5',
                                          'dil_conv_3x3', 'dil_conv_5x5'}

    def loss(params, z, x, edges=edges):
      out, updates = edges.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 x, z, keep, mutable=['batch_stats'])
      return jnp.sum(jnp.tanh(jnp.stack(out)) * weights), updates['batch_stats']

    results[impl, remat] = jax.device_get(jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1, 2), has_aux=True))(variables['params'], z, x))
  moved = lambda stats: jax.tree.map(lambda new, old: new - old, stats, variables['batch_stats'])
  (v_lax, stats_lax), g_lax = results['lax', False]
  for key in (('shift', False), ('shift', True), ('native', False), ('native', True)):
    (v_shift, stats_shift), g_shift = results[key]
    np.testing.assert_allclose(v_shift, v_lax, rtol=1e-5)
    # The running statistics move the same way (on the shift path DilConv
    # updates them from its fused op's outputs).
    _compare_grads(moved(stats_lax), moved(stats_shift), rel=1e-5)
    _compare_grads(g_lax, g_shift, rel=1e-5)
  # All weights present (SPEC §4 sizes at C = 4, per edge: sep3 104, sep5
  # 232, dil3 52, dil5 116, FactorizedReduce 16; 8 edges).
  assert sum(a.size for a in jax.tree_util.tree_leaves(g_lax[0])) == 8 * (104 + 232 + 52 + 116 + 16)


_SLOW = pytest.mark.skipif(not os.environ.get('SNAS_SLOW_TESTS'),
                           reason='1-3 min of XLA:CPU compiles; set SNAS_SLOW_TESTS=1')


@_SLOW
def test_lax_and_shift_cells_agree_in_loss_and_gradients():
  """A reduction cell (stride-2 edges from the inputs, stride-1 from the
  nodes: every op in both strides) with a soft Z: loss and gradients w.r.t.
  parameters, Z and both inputs agree between impls.

  Tolerance: the impls differ by float32 summation order (~1e-7 relative per
  op, op tests); train-mode BN over 4·4·4 = 64 values per channel divides by
  small standard deviations and the chain is 2 BNs deep, so allow 1e-4
  relative to each gradient leaf's largest entry (measured 1.9e-6)."""
  rng = np.random.default_rng(7)
  s0, s1 = (rng.normal(size=(N, HW, HW, 6)).astype(np.float32) for _ in range(2))
  alpha = rng.normal(size=(NUM_EDGES, NUM_OPS)).astype(np.float32)
  noise = -np.log(-np.log(rng.uniform(size=(NUM_EDGES, NUM_OPS)))).astype(np.float32)
  z = np.asarray(sampling.relaxed_sample(alpha, noise, 1.0))
  weights = rng.normal(size=(N, HW // 2, HW // 2, 4 * C)).astype(np.float32)
  results = {}
  for impl in ('lax', 'shift', 'native'):
    cell = sm.SearchCell(C, reduction=True, reduction_prev=False, train=True, impl=impl)
    if impl == 'lax':
      variables = _variables(jax.eval_shape(lambda: cell.init(jax.random.key(0), s0, s1, UNIFORM)), 8)

    def loss(params, z, s0, s1, cell=cell):
      out, _ = cell.apply({'params': params, 'batch_stats': variables['batch_stats']},
                          s0, s1, z, mutable=['batch_stats'])
      return jnp.sum(jnp.tanh(out) * weights)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
        variables['params'], z, s0, s1)
    results[impl] = jax.device_get((value, grads))
  v_lax, g_lax = results['lax']
  for impl in ('shift', 'native'):
    np.testing.assert_allclose(results[impl][0], v_lax, rtol=1e-5)
    _compare_grads(g_lax, results[impl][1])


@_SLOW
def test_lax_and_shift_networks_agree_in_loss_and_gradients():
  """The tiny network (2 cells, C = 4, 8x8, batch 4), gradients w.r.t. the
  parameters and Z; tolerance as in the cell test (measured 6.7e-6: the
  chain is 2 cells deep plus the stem BN)."""
  x = _images(20)
  labels = np.arange(N) % 10
  rng = np.random.default_rng(9)
  zr = jax.nn.softmax(jnp.asarray(rng.normal(size=(NUM_EDGES, NUM_OPS)), jnp.float32))
  results = {}
  for impl in ('lax', 'shift', 'native'):
    net = sm.SearchNetwork(**TINY, impl=impl)
    if impl == 'lax':
      variables = _variables(jax.eval_shape(lambda: net.init(jax.random.key(0), x, UNIFORM, zr, True)), 21)

    def loss(params, zr, net=net):
      logits, _ = net.apply({'params': params, 'batch_stats': variables['batch_stats']},
                            x, UNIFORM, zr, True, mutable=['batch_stats'])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    results[impl] = jax.device_get(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        variables['params'], zr))
  v_lax, g_lax = results['lax']
  for impl in ('shift', 'native'):
    np.testing.assert_allclose(results[impl][0], v_lax, rtol=1e-5)
    _compare_grads(g_lax, results[impl][1])
