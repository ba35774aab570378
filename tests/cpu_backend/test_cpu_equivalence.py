"""The CPU backend against the reference: its edge batches (every impl) and
whole networks (search and child, through the layout map) agree with the
reference model in values, gradients and BN statistics.

Tolerance: the backends compute the same sums in another order (float32,
~1e-7 relative per op); train-mode BN over few values per channel divides by
small standard deviations, so gradients are compared at 1e-4 relative to each
leaf's largest entry (measured ~3e-6).
"""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snas_jax import sampling
from snas_jax.spaces.darts import child_model, genotypes, search_model
from snas_jax.backends import cpu
from snas_jax.backends.cpu import forms as cpu_forms
from snas_jax.spaces.darts.genotypes import NUM_EDGES, NUM_OPS, PRIMITIVES

# The CPU backend runs on the CPU: skipped where JAX runs on another platform.
pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu',
                                reason='the CPU backend runs on the CPU only')

N, HW, C = 4, 8, 4
TINY = dict(c=C, layers=2, num_classes=10)
UNIFORM = jnp.full((NUM_EDGES, NUM_OPS), 1 / NUM_OPS, jnp.float32)


def _variables(shapes, seed):
  """Random params in the module's layout (BN scales near 1: a scale near 0
  makes float32 rounding dominate its gradient); BN statistics near a batch's."""
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32) if p[-1].key == 'scale'
      else rng.uniform(-0.5, 0.5, s.shape).astype(np.float32), shapes['params'])
  stats = jax.tree_util.tree_map_with_path(
      lambda p, s: (rng.uniform(0.5, 1.5, s.shape) if p[-1].key == 'var'
                    else rng.uniform(-0.1, 0.1, s.shape)).astype(np.float32),
      shapes['batch_stats'])
  return {'params': params, 'batch_stats': stats}


def _images(seed, n=N, hw=HW):
  return np.random.default_rng(seed).normal(size=(n, hw, hw, 3)).astype(np.float32)


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
  the whole network against the reference: below.)

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
    edges = cpu_forms.MixedEdges(C, stride=2, fan_out=4, train=True, impl=impl, remat=remat)
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
  # All weights present (docs/algorithm.md §4 sizes at C = 4, per edge: sep3 104, sep5
  # 232, dil3 52, dil5 116, FactorizedReduce 16; 8 edges).
  assert sum(a.size for a in jax.tree_util.tree_leaves(g_lax[0])) == 8 * (104 + 232 + 52 + 116 + 16)




def _assert_backends_agree(network, variables, args, kwargs, rngs=None, impls=('native',)):
  """Loss of the train-mode logits, its gradients (params and every array
  argument after the images), the updated BN statistics and eval-mode
  logits: reference == CPU backend (each impl)."""
  labels = np.arange(N) % 10
  variables = _shared_pools_alike(variables)

  def run(model):
    def loss(params, *args):
      out, new = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                             *args, **kwargs, train=True, mutable=['batch_stats'], rngs=rngs)
      logits = out[0] if isinstance(out, tuple) else out
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), new
    argnums = tuple(range(len(args) + 1))
    (value, new), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(
        variables['params'], *args)
    evaluated = jax.jit(lambda v, *a: model.apply(v, *a, **kwargs, train=False))(variables, *args)
    return jax.device_get((value, grads, new, evaluated))

  want = run(network)
  for impl in impls:
    got = run(cpu.CpuBackend(impl).bind(network))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    _compare_grads(want[1], got[1])
    _compare_grads(want[2], got[2], rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(want[3]), jax.tree_util.tree_leaves(got[3])):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def _shared_pools_alike(variables):
  """``variables`` with every search-cell pool's BN statistics equal across
  the edges leaving one source, as the reference keeps them (each such edge's
  BN sees the same tensor: they start equal and update alike), so that the
  CPU backend's one BN per source reads the same values as each edge's."""
  def alike(path, x):
    names = [getattr(p, 'key', '') for p in path]
    batch = next((n for n in names if n.startswith('edges_from_')), None)
    if batch is None or not any(n.endswith('pool_3x3') for n in names):
      return x
    s = len(batch.split('_')) - 2
    return np.tile(x[:s], (x.shape[0] // s, 1))
  return {**variables,
          'batch_stats': jax.tree_util.tree_map_with_path(alike, variables['batch_stats'])}


def test_cpu_forms_declare_the_reference_variables():
  """The networks with the CPU forms plugged in have the reference's variable
  tree (paths and shapes), for the search network and both child networks."""
  cases = [(search_model.SearchNetwork(c=8, layers=5), (_images(0, 1, 16), {'normal': UNIFORM, 'reduce': UNIFORM}, True), {}),
           (child_model.NetworkCIFAR(genotypes.DARTS_V2, 8, 5, 10),
            (_images(0, 2, 32), jnp.float32(0)), {'train': True}),
           (child_model.NetworkImageNet(genotypes.SNAS_MODERATE, 8, 3, 1000),
            (_images(0, 2, 224), jnp.float32(0)), {'train': True})]
  backend = cpu.CpuBackend('lax')
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  for network, args, kwargs in cases:
    ref = jax.eval_shape(lambda: network.init(rngs, *args, **kwargs))
    own = jax.eval_shape(lambda: backend.cpu_network(network).init(rngs, *args, **kwargs))
    assert jax.tree.structure(own) == jax.tree.structure(ref), type(network).__name__
    assert jax.tree.map(lambda a, b: a.shape == b.shape, own, ref) == jax.tree.map(lambda _: True, ref)


def test_cpu_backend_equals_reference_search_network():
  """3 cells (normal C=8, reduction 16, reduction 32 after a reduction:
  FactorizedReduce preprocessing), soft Z, drop-path 0.3: every op in both
  strides, fan-outs 1-4, shared pools."""
  network = search_model.SearchNetwork(c=8, layers=3, drop_path=0.3)
  rng = np.random.default_rng(5)
  zn, zr = (jax.nn.softmax(jnp.asarray(rng.normal(size=(NUM_EDGES, NUM_OPS)), jnp.float32))
            for _ in range(2))
  x = _images(6)
  variables = _variables(jax.eval_shape(lambda: network.init(jax.random.key(0), x, {'normal': zn, 'reduce': zr}, False)), 7)
  _assert_backends_agree(network, variables, (x, {'normal': zn, 'reduce': zr}), {}, rngs={'dropout': jax.random.key(8)},
                         impls=('native', 'shift') if os.environ.get('SNAS_SLOW_TESTS') else ('native',))


def test_cpu_backend_equals_reference_child_network():
  """A CIFAR child whose cells hold every op (both strides; FactorizedReduce
  preprocessing and skip), drop-path 0.2, affine BNs."""
  every_op = genotypes.Genotype(
      normal=[[('sep_conv_3x3', 0), ('max_pool_3x3', 1)], [('sep_conv_5x5', 0), ('avg_pool_3x3', 2)],
              [('dil_conv_3x3', 1), ('skip_connect', 3)], [('dil_conv_5x5', 2), ('skip_connect', 0)]],
      reduce=[[('skip_connect', 0), ('avg_pool_3x3', 1)], [('max_pool_3x3', 0), ('sep_conv_3x3', 2)],
              [('dil_conv_5x5', 1), ('sep_conv_5x5', 3)], [('dil_conv_3x3', 0), ('none', 4)]])
  network = child_model.NetworkCIFAR(every_op, 8, 3, 10, auxiliary=False)
  x = _images(9, hw=16)
  rate = jnp.float32(0.2)
  variables = _variables(jax.eval_shape(lambda: network.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, rate, train=True)), 10)
  _assert_backends_agree(network, variables, (x, rate), {}, rngs={'dropout': jax.random.key(11)})


def test_cpu_init_draws_reference_layout_variables():
  """The backend's fast init returns the reference's tree (paths, shapes), and
  different seeds give different draws."""
  network = search_model.SearchNetwork(c=4, layers=2)
  args = (_images(0, 1), {'normal': UNIFORM, 'reduce': UNIFORM}, False)
  ref = jax.eval_shape(lambda: network.init(jax.random.key(0), *args))
  backend = cpu.CpuBackend('lax')
  a = backend.init_variables(network, jax.random.key(1), *args)
  b = backend.init_variables(network, jax.random.key(2), *args)
  assert jax.tree.map(lambda s, v: s.shape == v.shape, ref, a) == jax.tree.map(lambda _: True, ref)
  kernel = lambda v: np.asarray(v['params']['cell_0']['edges_from_0_1']['sep_conv_3x3']['dil_0']['depthwise']['kernel'])
  assert not np.allclose(kernel(a), kernel(b))
  assert np.abs(kernel(a)).max() <= 1 / 3 + 1e-6  # U(±1/sqrt(fan_in)), fan_in = 9


def test_default_impl_falls_back_to_shift_without_kernels(monkeypatch):
  monkeypatch.setattr(cpu.native, '_load', lambda: 'no compiler (test)')
  with pytest.warns(UserWarning, match='native CPU kernels unavailable'):
    assert cpu.default_impl() == 'shift'


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
    cell = search_model.SearchCell(C, reduction=True, reduction_prev=False, train=True,
                                   forms=cpu_forms.forms(impl))
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
    net = search_model.SearchNetwork(**TINY, forms=cpu_forms.forms(impl))
    if impl == 'lax':
      variables = _variables(jax.eval_shape(lambda: net.init(jax.random.key(0), x, {'normal': UNIFORM, 'reduce': zr}, True)), 21)

    def loss(params, zr, net=net):
      logits, _ = net.apply({'params': params, 'batch_stats': variables['batch_stats']},
                            x, {'normal': UNIFORM, 'reduce': zr}, True, mutable=['batch_stats'])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    results[impl] = jax.device_get(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        variables['params'], zr))
  v_lax, g_lax = results['lax']
  for impl in ('shift', 'native'):
    np.testing.assert_allclose(results[impl][0], v_lax, rtol=1e-5)
    _compare_grads(g_lax, results[impl][1])


@pytest.mark.parametrize('space,layers,drop_path', [('darts', 3, 0.2), ('nb201', 1, 0.0)])
def test_checkpoint_crosses_backends(tmp_path, space, layers, drop_path):
  """A search state checkpointed under one backend restores under the other
  and continues: from the restored state, a step on either backend gives the
  same loss and the same updated α (both directions, through Orbax). NB201:
  the CPU backend runs its reference modules under its own init path."""
  from snas_jax import backends, checkpoint, costs, parallel, search, spaces
  cfg = search.SearchConfig(space=space, channels=4, layers=layers, batch_size=8, epochs=1,
                            resource_eta=1e-3, drop_path=drop_path)
  net, tx = search.make_network(cfg), search.make_optimizer(cfg, steps_per_epoch=10)
  mesh = parallel.make_mesh()
  tables = costs.penalty_tables(cfg.channels, cfg.layers, HW, space=space)
  steps = {name: search.make_train_step(cfg, backends.get(name).bind(net), tx, tables, mesh)
           for name in ('reference', 'cpu')}
  rng = np.random.default_rng(0)
  batches = [parallel.to_global({'image': rng.normal(size=(8, HW, HW, 3)).astype(np.float32),
                                 'label': rng.integers(0, 10, 8).astype(np.int32)}, mesh)
             for _ in range(2)]
  tau = np.float32(0.5)
  abstract = checkpoint.abstract_like(search.abstract_state(cfg, net, tx, (HW, HW, 3)),
                                      parallel.replicated(mesh))
  copy = lambda state: jax.tree.map(jnp.copy, state)  # the steps donate their input
  state = search.init_state(cfg, net, tx, (HW, HW, 3), parallel.replicated(mesh),
                            backends.get('cpu'))
  for i, (first, second) in enumerate((('cpu', 'reference'), ('reference', 'cpu'))):
    state, _ = steps[first](copy(state), batches[0], tau)
    ckpt = checkpoint.Checkpointer(str(tmp_path / first))
    ckpt.save(int(state.step), state, {'saved_by': first})
    ckpt.close()
    restored, meta = checkpoint.Checkpointer(str(tmp_path / first)).restore(abstract)
    assert meta['saved_by'] == first
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    after = {name: jax.device_get(steps[name](copy(restored), batches[1], tau))
             for name in (second, first)}
    np.testing.assert_allclose(after[second][1]['loss'], after[first][1]['loss'], rtol=1e-5)
    for cell in spaces.get(space).cell_types:
      np.testing.assert_allclose(after[second][0].params['alpha'][cell],
                                 after[first][0].params['alpha'][cell], rtol=1e-5, atol=1e-7)
    assert int(after[second][0].step) == int(state.step) + 1 == i + 2
    state = restored
