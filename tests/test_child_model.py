"""Tests for snas_jax.spaces.darts.child_model: sizes against docs/algorithm.md's op definitions, aux heads,
drop-path, initialisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snas_jax import layers
from snas_jax.spaces.darts import child_model, genotypes

RNGS = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}


# ----------------------------------------------------------------------------
# An independent parameter count, written from docs/algorithm.md §1/§7's op definitions
# (not read from the model). BN has a scale and an offset per channel in the
# child (affine); running statistics are not parameters.


def _op_params(name: str, c: int, stride: int) -> int:
  bn = 2 * c
  if name == 'none':
    return 0
  if name == 'skip_connect':  # identity, or FactorizedReduce: two 1x1 convs C -> C/2, BN
    return 0 if stride == 1 else 2 * c * (c // 2) + bn
  if name in ('max_pool_3x3', 'avg_pool_3x3'):  # pool -> BN (ref)
    return bn
  k = int(name[-1])
  dil_conv = c * k * k + c * c + bn  # depthwise kxk, 1x1, BN
  return 2 * dil_conv if name.startswith('sep_conv') else dil_conv


def _closed_form_params(genotype, c: int, layers: int, dataset: str) -> int:
  classes = 10 if dataset == 'cifar10' else 1000
  if dataset == 'cifar10':  # conv3x3 3 -> 3C, BN
    total = 3 * 3 * 3 * 3 * c + 2 * 3 * c
    c_pp = c_p = 3 * c
    reduction_prev = False
  else:  # conv3x3 3 -> C/2, BN, conv3x3 C/2 -> C, BN; conv3x3 C -> C, BN
    half = c // 2
    total = 27 * half + 2 * half + 9 * half * c + 2 * c + 9 * c * c + 2 * c
    c_pp = c_p = c
    reduction_prev = True
  c_cell = c
  for i in range(layers):
    reduction = i in (layers // 3, 2 * layers // 3)
    c_cell *= 2 if reduction else 1
    # preprocess0: FactorizedReduce after a reduction, else ReLU-1x1-BN; preprocess1: ReLU-1x1-BN
    total += (2 * c_pp * (c_cell // 2) if reduction_prev else c_pp * c_cell) + 2 * c_cell
    total += c_p * c_cell + 2 * c_cell
    for node in (genotype.reduce if reduction else genotype.normal):
      for op, state in node:
        total += _op_params(op, c_cell, 2 if reduction and state < 2 else 1)
    c_pp, c_p = c_p, len(genotype.concat) * c_cell
    reduction_prev = reduction
  return total + c_p * classes + classes  # Dense


def _model_params(model, size: int):
  variables = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((2, size, size, 3)),
                                                jnp.float32(0), train=True))
  return variables['params']


def _count(params, skip_aux=True) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(int(np.prod(x.shape)) for path, x in leaves
             if not (skip_aux and path[0].key == child_model.AUX_SCOPE))


# Paper / DARTS figures (millions, auxiliary head excluded): a sanity check on
# the closed form itself.
PAPER_PARAMS_M = {('DARTS_V2', 'cifar10'): 3.3, ('SNAS_moderate', 'cifar10'): 2.8,
                  ('SNAS_aggressive', 'cifar10'): 2.3, ('SNAS_moderate', 'imagenet'): 4.3,
                  ('DARTS_V2', 'imagenet'): 4.7}


@pytest.mark.parametrize('dataset,c,layers,size', [('cifar10', 36, 20, 32),
                                                    ('imagenet', 48, 14, 224)])
@pytest.mark.parametrize('name', sorted(genotypes.PUBLISHED))
def test_published_param_counts_match_closed_form(name, dataset, c, layers, size):
  genotype = genotypes.published(name)
  cls = child_model.NetworkCIFAR if dataset == 'cifar10' else child_model.NetworkImageNet
  model = cls(genotype, c, layers, 10 if dataset == 'cifar10' else 1000)
  expected = _closed_form_params(genotype, c, layers, dataset)
  assert _count(_model_params(model, size)) == expected
  if (name, dataset) in PAPER_PARAMS_M:
    assert abs(expected / 1e6 - PAPER_PARAMS_M[name, dataset]) < 0.06


# ----------------------------------------------------------------------------
# Auxiliary heads.


def _shapes(model, size, train):
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(RNGS, x, jnp.float32(0), train=True))
  out = jax.eval_shape(lambda v: model.apply(v, x, jnp.float32(0), train=train, rngs=RNGS,
                                             mutable=['batch_stats'])[0], variables)
  return variables['params'], out


def test_cifar_auxiliary_head_shape_and_training_only():
  model = child_model.NetworkCIFAR(genotypes.DARTS_V2, 8, 3, 10)
  params, (logits, aux) = _shapes(model, 32, train=True)
  assert logits.shape == (2, 10) and aux.shape == (2, 10)
  _, (_, aux_eval) = _shapes(model, 32, train=False)
  assert aux_eval is None
  head = params[child_model.AUX_SCOPE]
  # ReLU, avgpool 5/3 on 8x8 -> 2x2, 1x1 conv 128, BN, ReLU, 2x2 conv 768, BN, ReLU, Dense.
  c_aux = 4 * 8 * 4  # after cell 2L//3 = 2 (the second reduction): 4 nodes x 4C
  assert head['conv0']['kernel'].shape == (1, 1, c_aux, 128)
  assert head['conv1']['kernel'].shape == (2, 2, 128, 768)
  assert head['classifier']['kernel'].shape == (768, 10)
  assert {'bn0', 'bn1'} <= set(head)
  no_aux, _ = _shapes(child_model.NetworkCIFAR(genotypes.DARTS_V2, 8, 3, 10, auxiliary=False), 32, train=True)
  assert child_model.AUX_SCOPE not in no_aux
  assert _count(no_aux) == _count(params)  # the head is the only difference


def test_imagenet_auxiliary_head_and_stems():
  model = child_model.NetworkImageNet(genotypes.SNAS_MODERATE, 8, 3, 1000)
  params, (logits, aux) = _shapes(model, 224, train=True)
  assert logits.shape == (2, 1000) and aux.shape == (2, 1000)
  head = params[child_model.AUX_SCOPE]
  assert 'bn1' not in head  # the reference's ImageNet head has no BN after the 768 conv
  assert head['classifier']['kernel'].shape == (768, 1000)  # 7x7 -> pool 5/2 -> 2x2 -> conv 2x2
  assert params['stem0_conv0']['kernel'].shape == (3, 3, 3, 4)
  assert params['stem0_conv1']['kernel'].shape == (3, 3, 4, 8)
  assert params['stem1_conv']['kernel'].shape == (3, 3, 8, 8)
  # Cell 0 reads the stem0 output (56x56) through FactorizedReduce (reduction_prev).
  assert 'kernel' in params['cell_0']['preprocess0']['conv_1']


def test_auxiliary_head_too_small_is_one_line_error():
  model = child_model.NetworkImageNet(genotypes.DARTS_V2, 8, 3, 1000)
  with pytest.raises(ValueError, match='--auxiliary_weight=0') as err:
    _shapes(model, 64, train=True)
  assert '\n' not in str(err.value)


# ----------------------------------------------------------------------------
# Drop-path.


def test_drop_path_scales_whole_samples_and_preserves_the_mean():
  x = jnp.ones((4000, 2, 2, 3))
  y = layers.drop_path(x, jnp.float32(0.3), jax.random.PRNGKey(0))
  y = np.asarray(y).reshape(4000, -1)
  dropped = (y == 0).all(1)
  kept = np.isclose(y, 1 / 0.7).all(1)
  assert (dropped | kept).all()  # one mask value per sample
  assert abs(dropped.mean() - 0.3) < 0.03
  assert abs(y.mean() - 1.0) < 0.05
  np.testing.assert_array_equal(layers.drop_path(x, jnp.float32(0), jax.random.PRNGKey(0)), x)


def _cell_outputs(cell, rates, reduction=False, train=True, c=4):
  """(params, [output for each drop rate]) of one ChildCell on a fixed input."""
  module = child_model.ChildCell(cell, genotypes.CONCAT, c, reduction, False)
  s = jax.random.normal(jax.random.PRNGKey(3), (8, 8, 8, c))
  # rbg keys: XLA:CPU compiles threefry's draws far more slowly.
  rngs = {k: jax.random.key(i, impl='rbg') for i, k in enumerate(RNGS)}
  variables = jax.jit(lambda: module.init(rngs, s, s, jnp.float32(0), True))()
  apply = jax.jit(lambda rate: module.apply(variables, s, s, rate, train, rngs=rngs,
                                            mutable=['batch_stats'])[0])
  return variables['params'], [np.asarray(apply(jnp.float32(r))) for r in rates]


IDENTITY_CELL = ((('skip_connect', 0), ('skip_connect', 1)), (('skip_connect', 2),),
                 (('skip_connect', 0),), (('skip_connect', 1), ('skip_connect', 3)))
CONV_CELL = ((('sep_conv_3x3', 0), ('skip_connect', 1)),) + IDENTITY_CELL[1:]


def test_drop_path_exempts_identity_edges():
  _, (plain, dropped) = _cell_outputs(IDENTITY_CELL, (0.0, 0.9))
  np.testing.assert_array_equal(plain, dropped)
  _, (plain, dropped) = _cell_outputs(CONV_CELL, (0.0, 0.9))
  assert not np.allclose(plain, dropped)


def test_drop_path_inactive_in_eval():
  _, (plain, dropped) = _cell_outputs(CONV_CELL, (0.0, 0.9), train=False)
  np.testing.assert_array_equal(plain, dropped)


# ----------------------------------------------------------------------------
# 'none' edges and empty nodes.


def test_none_edges_have_no_params_and_empty_nodes_are_zero():
  reduce_cell = genotypes.SNAS_AGGRESSIVE.reduce  # nodes 2, 3: only 'none' edges
  params, (out,) = _cell_outputs(reduce_cell, (0.0,), reduction=True)
  assert sorted(k for k in params if k.startswith('node')) == [
      'node0_edge0_sep_conv_5x5', 'node1_edge0_sep_conv_5x5']
  assert out.shape == (8, 4, 4, 4 * 4)  # stride 2, 4 nodes x C
  assert np.abs(out[..., :8]).sum() > 0
  np.testing.assert_array_equal(out[..., 8:], 0.0)  # nodes 2 and 3


def test_remat_network_traces_and_differentiates():
  """remat=True wraps each cell in nn.remat with `train` static; traced only (fast)."""
  x = jnp.zeros((2, 32, 32, 3))
  model = child_model.NetworkCIFAR(genotypes.DARTS_V2, 4, 3, 10, remat=True)
  variables = jax.eval_shape(lambda: model.init(RNGS, x, jnp.float32(0), train=True))
  loss = lambda p, stats: model.apply({'params': p, 'batch_stats': stats}, x, jnp.float32(0.2),
                                      train=True, rngs=RNGS, mutable=['batch_stats'])[0][0].sum()
  grads = jax.eval_shape(jax.grad(loss), variables['params'], variables['batch_stats'])
  assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(lambda p: p.shape,
                                                                variables['params'])


def test_snas_init_draws_the_authors_distributions():
  """--init=snas: conv kernels N(0, 2/(k²·C_out)), dense kernels N(0, 2/fan_in),
  dense biases zero, BN untouched; --init=pytorch leaves the draw alone."""
  model = child_model.NetworkCIFAR(genotypes.DARTS_V2, 16, 5, 10)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  params = jax.jit(lambda: model.init(rngs, jnp.zeros((2, 32, 32, 3)), jnp.float32(0), train=True))()['params']
  assert layers.reinitialize(params, 'pytorch', 0) is params
  new = layers.reinitialize(params, 'snas', 0)
  stem = np.asarray(new['stem_conv']['kernel'])  # [3, 3, 3, 48]: std sqrt(2 / (9 · 48))
  np.testing.assert_allclose(stem.std(), np.sqrt(2 / (9 * 48)), rtol=0.1)
  dw = np.asarray(new['cell_0']['node0_edge0_sep_conv_3x3']['dil_0']['depthwise']['kernel'])
  assert dw.shape == (3, 3, 1, 16)
  dense = np.asarray(new['classifier']['kernel'])  # [256, 10]
  np.testing.assert_allclose(dense.std(), np.sqrt(2 / dense.shape[0]), rtol=0.15)
  np.testing.assert_array_equal(np.asarray(new['classifier']['bias']), 0)
  np.testing.assert_array_equal(np.asarray(new['stem_bn']['scale']), 1)
  with pytest.raises(ValueError, match='unknown --init'):
    layers.reinitialize(params, 'xavier', 0)
