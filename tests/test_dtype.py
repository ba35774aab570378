"""Mixed precision (--dtype=bfloat16): convolutions and activations in
bfloat16, parameters, α, BN statistics, logits and the optimiser state in
float32; the CPU backend is float32 only.

Tolerance of the bfloat16 gradients: the yardstick is how far merely rounding
the inputs and weights to bfloat16 moves the float32 gradients (global
relative L2 error; on the test's two edges: 3.6% for the weights, 0.2% for
z). Computing in bfloat16 may move them at most 3x that, and 30% at most
(measured: 4.7% and 0.46%); the loss within 1%.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from snas_jax import backends, costs, search
from snas_jax.spaces.darts import child_model, genotypes
from snas_jax.spaces.darts import search_model as sm

N, HW = 8, 8
CFG = dict(channels=4, layers=3, batch_size=N, backend='reference')  # reductions at 1 and 2


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(N, HW, HW, 3)).astype(np.float32)
  labels = rng.integers(0, 10, N)
  z = [jax.nn.softmax(jnp.asarray(rng.normal(size=(14, 8)), jnp.float32)) for _ in range(2)]
  return images, labels, z


def _relative_error(a, b) -> float:
  flat = lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(t)])
  a, b = flat(a), flat(b)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))


def test_bfloat16_edge_loss_and_gradients_match_float32():
  """Two edges of a search cell (all 7 ops, non-affine BN, the z-weighted sum)
  under a linear head and cross-entropy: the gradients of their weights and
  of z (α's, through the sample) as the search step takes them. z's gradient
  sums 8,192 products per op: accumulated in bfloat16 (as XLA:CPU does a
  bfloat16 reduction) it would be 25% off. (The whole network's: loss within
  0.2%, gradients 13% against rounding's 8%; too slow to compile for a unit
  test.)"""
  edges = sm.EdgeBatch(16, 1, True)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, N, HW, HW, 16)).astype(np.float32)
  _, labels, (z, _) = _inputs()
  z = z[:2]
  head = rng.normal(size=(16, 10)).astype(np.float32) / 4
  variables = edges.init(jax.random.key(0), x, z)

  @functools.partial(jax.jit, static_argnums=0)
  def loss_and_grads(dtype, w, z, x):
    def loss(w, z):
      out, new = edges.apply({'params': w, 'batch_stats': variables['batch_stats']},
                             x.astype(dtype), z, mutable=['batch_stats'])
      logits = jnp.mean(out.sum(0).astype(jnp.float32), axis=(1, 2)) @ head
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w, z)

  (loss, stats), grads = loss_and_grads(jnp.float32, variables['params'], z, x)
  (loss_h, stats_h), grads_h = loss_and_grads(jnp.bfloat16, variables['params'], z, x)
  to_bf16 = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), t)
  _, grads_rounded = loss_and_grads(jnp.float32, to_bf16(variables['params']), z, to_bf16(x))

  chex.assert_trees_all_equal_dtypes(grads_h, grads)  # float32 gradients, BN statistics
  chex.assert_trees_all_equal_dtypes(stats_h, stats)
  chex.assert_trees_all_close(loss_h, loss, rtol=1e-2)
  chex.assert_trees_all_close(stats_h, stats, atol=1e-2, rtol=1e-2)
  for part in range(2):  # w, z
    rounding = _relative_error(grads[part], grads_rounded[part])
    error = _relative_error(grads[part], grads_h[part])
    assert 0 < error < min(3 * rounding, 0.3), (part, error, rounding)


def test_bfloat16_runs_every_convolution_in_bfloat16_and_keeps_the_state_float32():
  """No compile: the search step's jaxpr (forward and backward convolutions)
  and its outputs' dtypes."""
  images, labels, _ = _inputs()
  cfg = search.SearchConfig(**CFG, dtype='bfloat16', resource_eta=1e-3)
  net, tx = search.make_network(cfg), search.make_optimizer(cfg, 10)
  variables = jax.eval_shape(lambda: search.init_variables(cfg, net, (HW, HW, 3)))
  state = jax.eval_shape(lambda v: search.state_from_variables(cfg, tx, v), variables)
  step = search.train_step_fn(cfg, net, tx, costs.penalty_tables(cfg.channels, cfg.layers, HW))
  jaxpr = jax.make_jaxpr(step, return_shape=True)(
      state, {'image': images, 'label': labels}, np.float32(1.0))
  convs = [e for e in _equations(jaxpr[0].jaxpr) if e.primitive.name == 'conv_general_dilated']
  assert len(convs) > 100  # forward and backward
  assert {str(x.aval.dtype) for e in convs for x in e.invars} == {'bfloat16'}
  out, metrics = jaxpr[1]
  dtypes = {str(x.dtype) for x in jax.tree.leaves((out.params, out.batch_stats, out.opt_state))}
  assert dtypes == {'float32', 'int32'}  # int32: optimiser step counts
  assert metrics['loss'].dtype == jnp.float32


def test_child_network_in_bfloat16_has_float32_logits_and_parameters():
  genotype = genotypes.PUBLISHED['SNAS_mild']
  net = child_model.NetworkCIFAR(genotype, 4, 3, 10, auxiliary=False, dtype=jnp.bfloat16)
  images = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: net.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, images, jnp.float32(0.2), True))
  assert {str(x.dtype) for x in jax.tree.leaves(variables)} == {'float32'}
  jaxpr = jax.make_jaxpr(lambda v: net.apply(v, images, jnp.float32(0.2), True,
                                             mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)}))(variables)
  convs = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == 'conv_general_dilated']
  assert convs and {str(e.invars[0].aval.dtype) for e in convs} == {'bfloat16'}
  (logits, _), _ = jax.eval_shape(lambda v: net.apply(v, images, jnp.float32(0.2), True,
                                                      mutable=['batch_stats'],
                                                      rngs={'dropout': jax.random.key(2)}), variables)
  assert logits.dtype == jnp.float32


def test_cpu_backend_is_float32_only():
  assert backends.resolve('auto', 'cpu', dtype='bfloat16') == 'reference'
  assert backends.resolve('auto', 'cpu', dtype='float32') == 'cpu'
  assert backends.resolve('auto', 'accelerator', dtype='bfloat16') == 'reference'
  from snas_jax.backends import cpu
  net = search.make_network(search.SearchConfig(**CFG, dtype='bfloat16'))
  with pytest.raises(ValueError, match='float32 only: use --backend=reference with --dtype=bfloat16'):
    cpu.CpuBackend(impl='lax').bind(net)


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it (vmap, remat, custom VJPs)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          yield from _equations(getattr(inner, 'jaxpr', inner))
