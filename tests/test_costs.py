"""Tests for snas_jax.costs: the resource constraint of docs/algorithm.md §4 (eq. 9–11).

Monte-Carlo checks state N and their tolerance in standard errors (se); keys
are fixed, so they are deterministic, and each also checks that its tolerance
is small next to the effect it must detect.
"""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snas_jax import costs, sampling
from snas_jax.spaces.darts import genotypes
from snas_jax.spaces import darts
from snas_jax.spaces.darts.genotypes import EDGES, NUM_EDGES, NUM_OPS, PRIMITIVES

N_MC = 20_000


# ----------------------------------------------------------------------------
# (a) gradient estimators of ∇_α E[C].


@pytest.fixture(scope='module')
def estimator_setup():
  """α [14, 8] ~ N(0, 1) and a realistic table: the first reduction cell's log
  costs (rows differ: stride-2 edges from the inputs, stride-1 from nodes)."""
  table = jnp.asarray(costs.penalty_tables(16, 8, 32)['reduce'])
  rng = np.random.default_rng(0)
  alpha = jnp.asarray(rng.normal(size=(NUM_EDGES, NUM_OPS)), jnp.float32)
  # Gumbel noise from numpy (jax.random would compile per shape; the noise
  # generator itself is tested in test_sampling.py).
  noise = jnp.asarray(-np.log(-np.log(rng.uniform(size=(N_MC, NUM_EDGES, NUM_OPS)))), jnp.float32)
  exact = jax.grad(lambda a: costs.resource_penalty(a, None, None, table, 'exact'))(alpha)
  return alpha, table, noise, np.asarray(exact, np.float64)


def _per_sample(fn, noise):
  return np.asarray(jax.jit(jax.vmap(fn))(noise), np.float64)


def test_exact_estimator_is_the_expectation(estimator_setup):
  alpha, table, _, exact = estimator_setup
  p = jax.nn.softmax(alpha)
  value = costs.resource_penalty(alpha, None, None, table, 'exact')
  np.testing.assert_allclose(float(value), float((p * table).sum()), rtol=1e-6)
  np.testing.assert_allclose(float(costs.expected_cost(alpha, table)), float(value), rtol=1e-6)
  # ∂/∂α_j Σ_k p_k c_k = p_j (c_j − Σ_k p_k c_k), per edge.
  p, c = np.asarray(p, np.float64), np.asarray(table, np.float64)
  want = p * (c - (p * c).sum(-1, keepdims=True))
  np.testing.assert_allclose(exact, want, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match='unknown resource estimator'):
    costs.resource_penalty(alpha, None, None, table, 'reinforce')


def test_score_estimator_is_unbiased_and_local_credit_beats_global(estimator_setup):
  alpha, table, noise, exact = estimator_setup

  def local(g):  # eq. 11 as implemented: per-edge credit C_e(Z_e)
    z_hard = sampling.hard_sample(alpha, g)
    return jax.grad(lambda a: costs.resource_penalty(a, None, z_hard, table, 'score'))(alpha)

  def global_(g):  # every edge's ∇ log p(Z_e) times the total C(Z)
    z_hard = sampling.hard_sample(alpha, g)
    total = (z_hard * table).sum()
    return jax.grad(lambda a: sampling.categorical_log_prob(z_hard, a).sum() * total)(alpha)

  loc, glo = _per_sample(local, noise), _per_sample(global_, noise)
  for est in (loc, glo):  # both are unbiased
    mean, se = est.mean(0), est.std(0) / np.sqrt(N_MC)
    # 112 components within 5 se (P(any fails) < 112 * 5.7e-7).
    assert np.max(np.abs(mean - exact) / se) < 5.0
  # Sharpness of the local check: 5 se < 10% of the largest exact component.
  assert 5 * (loc.std(0) / np.sqrt(N_MC)).max() < 0.1 * np.abs(exact).max()
  # Variance (trace of the covariance over the 112 components): the other 13
  # edges' costs are pure noise in the global credit. With these keys the ratio
  # is ~160x; assert > 20x (variance estimates from N = 20,000 are good to a few %).
  var_local, var_global = loc.var(0).sum(), glo.var(0).sum()
  assert var_local * 20 < var_global, (var_local, var_global)


def test_pathwise_estimator_approaches_exact_as_tau_decreases(estimator_setup):
  """The pathwise estimator is unbiased for ∇_α E[C(soft Z)], which is not
  ∇_α E[C(hard Z)] at τ = 1 (a bias of ~66 se at N = 20,000) but tends to it
  as τ → 0; its variance grows like 1/τ, so at small τ what can be asserted
  is that the error is at the Monte-Carlo noise level."""
  alpha, table, noise, exact = estimator_setup

  def errors(tau):
    def pathwise(g):
      return jax.grad(lambda a: costs.resource_penalty(
          a, sampling.relaxed_sample(a, g, tau), None, table, 'pathwise'))(alpha)
    est = _per_sample(pathwise, noise)
    se = est.std(0) / np.sqrt(N_MC)
    # ‖noise‖ ≈ sqrt(Σ se²) for 112 roughly independent components.
    return np.linalg.norm(est.mean(0) - exact), np.sqrt((se ** 2).sum())

  err1, noise1 = errors(1.0)
  err05, _ = errors(0.5)
  err_small, noise_small = errors(0.05)
  assert err1 > 20 * noise1  # a real bias at τ = 1
  assert err05 < err1 and err_small < err05  # decreasing with τ
  assert err_small < err1 / 4
  assert err_small < 3 * noise_small  # consistent with zero bias at τ = 0.05
  # Its value: C(soft Z) (the mean of the soft sample's cost).
  z = sampling.relaxed_sample(alpha, noise[0], 0.5)
  np.testing.assert_allclose(
      float(costs.resource_penalty(alpha, z, None, table, 'pathwise')),
      float((z * table).sum()), rtol=1e-6)


# ----------------------------------------------------------------------------
# (b) cost tables.


def _row(table, name):
  return tuple(int(v) for v in table[PRIMITIVES.index(name)])


def test_cell_cost_table_spec_check_values():
  """docs/algorithm.md §4's check values: first search cell, C = 16, 32x32, normal."""
  t = darts.cell_cost_table(16, 32, reduction=False)
  assert t.shape == (NUM_EDGES, NUM_OPS, 3)
  want = {
      'none': (0, 0, 0),
      'max_pool_3x3': (0, 147_456, 32_768),
      'avg_pool_3x3': (0, 147_456, 32_768),
      'skip_connect': (0, 0, 32_768),
      'sep_conv_3x3': (800, 819_200, 131_872),
      'sep_conv_5x5': (1_312, 1_343_488, 132_384),
      'dil_conv_3x3': (400, 409_600, 65_936),
      'dil_conv_5x5': (656, 671_744, 66_192),
  }
  for e in range(NUM_EDGES):  # stride 1 on every edge of a normal cell
    for name, values in want.items():
      assert _row(t[e], name) == values, (e, name)


# Written out by hand from docs/algorithm.md §4's formulas, C = 32, y = 16 (area 256).
_STRIDE2_C32_Y16 = {
    'none': (0, 0, 0),
    'max_pool_3x3': (0, 73_728, 40_960),         # MAC 5 y² C
    'avg_pool_3x3': (0, 73_728, 40_960),
    'skip_connect': (1_024, 262_144, 74_752),   # FR: 2·32·16; 2y²(4C + C/2) + size
    'sep_conv_3x3': (2_624, 671_744, 92_736),   # y²(10C + C) + size
    'sep_conv_5x5': (3_648, 933_888, 93_760),
    'dil_conv_3x3': (1_312, 335_872, 58_656),   # y²(6C + C) + size
    'dil_conv_5x5': (1_824, 466_944, 59_168),
}
_STRIDE1_C32_Y16 = {
    'none': (0, 0, 0),
    'max_pool_3x3': (0, 73_728, 16_384),
    'avg_pool_3x3': (0, 73_728, 16_384),
    'skip_connect': (0, 0, 16_384),
    'sep_conv_3x3': (2_624, 671_744, 68_160),
    'sep_conv_5x5': (3_648, 933_888, 69_184),
    'dil_conv_3x3': (1_312, 335_872, 34_080),
    'dil_conv_5x5': (1_824, 466_944, 34_592),
}


def test_cell_cost_table_reduction_cell_strides():
  """First reduction cell (C = 32, output 16x16): the 8 edges from the two
  inputs are stride 2 (rows 0,1 | 2,3 | 5,6 | 9,10), the rest stride 1."""
  t = darts.cell_cost_table(32, 16, reduction=True)
  stride2_rows = [e for e, (_, s) in enumerate(EDGES) if s < 2]
  assert stride2_rows == [0, 1, 2, 3, 5, 6, 9, 10]
  for e in range(NUM_EDGES):
    want = _STRIDE2_C32_Y16 if e in stride2_rows else _STRIDE1_C32_Y16
    for name, values in want.items():
      assert _row(t[e], name) == values, (e, name)


def _tied_pairs(table_row, kinds, names):
  idx = [costs.COST_KINDS.index(k) for k in kinds]
  rows = {n: tuple(table_row[PRIMITIVES.index(n)][idx]) for n in names}
  return {frozenset(p) for p in itertools.combinations(names, 2) if rows[p[0]] == rows[p[1]]}


def test_which_cost_combinations_separate_the_parameter_free_ops():
  """Appendix F: no single cost tells none / skip / pools apart.

  What is true of the docs/algorithm.md §4 table (normal cell, stride 1), exactly:
  params ties all four; FLOPs ties none–skip and max–avg; MAC ties the pools
  with skip; params+FLOPs still ties none–skip; FLOPs+MAC already separates
  everything but max–avg, and so does params+FLOPs+MAC. max and avg pool have
  identical costs by design (no cost can tell them apart).
  """
  row = darts.cell_cost_table(16, 32, reduction=False)[0]
  free = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect')
  P = lambda a, b: frozenset((a, b))
  max_avg = P('max_pool_3x3', 'avg_pool_3x3')
  all_pairs = {frozenset(p) for p in itertools.combinations(free, 2)}
  want = {
      ('params',): all_pairs,
      ('flops',): {P('none', 'skip_connect'), max_avg},
      ('mac',): {max_avg, P('max_pool_3x3', 'skip_connect'), P('avg_pool_3x3', 'skip_connect')},
      ('params', 'flops'): {P('none', 'skip_connect'), max_avg},
      ('params', 'mac'): {max_avg, P('max_pool_3x3', 'skip_connect'),
                          P('avg_pool_3x3', 'skip_connect')},
      ('flops', 'mac'): {max_avg},
      ('params', 'flops', 'mac'): {max_avg},
  }
  for kinds, pairs in want.items():
    assert _tied_pairs(row, kinds, free) == pairs, kinds
  # All three costs separate every pair of the 8 ops except max–avg.
  assert _tied_pairs(row, costs.COST_KINDS, PRIMITIVES) == {max_avg}
  # Stride 2 (FactorizedReduce has weights): params alone separates skip.
  row2 = darts.cell_cost_table(32, 16, reduction=True)[0]
  assert _tied_pairs(row2, ('params',), free) == {
      P('none', 'max_pool_3x3'), P('none', 'avg_pool_3x3'), max_avg}


@pytest.mark.parametrize('layers,n_normal,n_reduce', [(8, 6, 2), (5, 3, 2)])
def test_network_cost_tables_cell_counts(layers, n_normal, n_reduce):
  tables = darts.network_cost_tables(16, layers, 32)
  assert tables['normal'].shape == (n_normal, NUM_EDGES, NUM_OPS, 3)
  assert tables['reduce'].shape == (n_reduce, NUM_EDGES, NUM_OPS, 3)
  # Per-cell geometry: L = 8 reduces at cells 2 and 5; L = 5 at cells 1 and 3.
  if layers == 8:
    normal_geo = [(16, 32)] * 2 + [(32, 16)] * 2 + [(64, 8)] * 2
    reduce_geo = [(32, 16), (64, 8)]
  else:
    normal_geo = [(16, 32), (32, 16), (64, 8)]
    reduce_geo = [(32, 16), (64, 8)]
  for i, (c, y) in enumerate(normal_geo):
    np.testing.assert_array_equal(tables['normal'][i], darts.cell_cost_table(c, y, False))
  for i, (c, y) in enumerate(reduce_geo):
    np.testing.assert_array_equal(tables['reduce'][i], darts.cell_cost_table(c, y, True))
  # Hand-check one reduction-cell entry (C = 64, y = 8, stride-2 sep3):
  # size 2·64·9 + 2·64² = 9,344; FLOPs 9,344·64; MAC 64·(11·64) + 9,344.
  assert tuple(tables['reduce'][-1][0, PRIMITIVES.index('sep_conv_3x3')]) == (
      9_344, 9_344 * 64, 64 * 11 * 64 + 9_344)


def _penalty(z, tables):
  return sum(float((np.asarray(z[t]) * tables[t]).sum()) for t in ('normal', 'reduce'))


@pytest.mark.parametrize('transform', ['log', 'linear'])
def test_penalty_tables_normalisation(transform):
  layers = 8
  tables = costs.penalty_tables(16, layers, 32, transform=transform)
  for t in ('normal', 'reduce'):
    assert tables[t].shape == (NUM_EDGES, NUM_OPS) and tables[t].dtype == np.float32
  none = np.zeros((NUM_EDGES, NUM_OPS), np.float32)
  none[:, 0] = 1
  assert _penalty({'normal': none, 'reduce': none}, tables) == 0.0
  # C(Z) is the mean over all cells and edges of the op's cost (mean over the
  # three kinds, of log max(cost, 1) or the raw cost), recomputed here.
  raw = darts.network_cost_tables(16, layers, 32)
  f = (lambda v: np.log(np.maximum(v, 1.0))) if transform == 'log' else (lambda v: v)
  uniform = np.full((NUM_EDGES, NUM_OPS), 1 / NUM_OPS, np.float32)
  for z in (uniform, genotypes.cell_to_one_hot(genotypes.SNAS_MILD.normal)):
    per_cell = [(z[None] * f(raw[t]).mean(-1)).sum((1, 2)) / NUM_EDGES for t in raw]
    want = np.concatenate(per_cell).mean()
    assert np.concatenate(per_cell).shape == (layers,)
    np.testing.assert_allclose(_penalty({'normal': z, 'reduce': z}, tables), want, rtol=1e-5)


def test_penalty_is_a_per_cell_mean_independent_of_depth():
  """If every cell had the same table, C(uniform Z) would not depend on L.

  (The real tables differ per cell, as C and y change, so the invariance is
  checked by giving every cell the same table.)"""
  same = darts.cell_cost_table(16, 32, reduction=False)

  def fake_tables(c, layers, image_size):
    n_reduce = len(genotypes.reduction_layers(layers))
    return {'normal': np.stack([same] * (layers - n_reduce)),
            'reduce': np.stack([same] * n_reduce)}

  space = dataclasses.replace(darts.SPACE, cost_tables=fake_tables)
  uniform = np.full((NUM_EDGES, NUM_OPS), 1 / NUM_OPS, np.float32)
  want = np.log(np.maximum(same, 1.0)).mean(-1).mean(-1).mean()  # one cell's edge mean
  for layers in (3, 5, 8, 20):
    tables = costs.penalty_tables(16, layers, 32, space=space)
    got = _penalty({'normal': uniform, 'reduce': uniform}, tables)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_penalty_tables_reject_bad_arguments():
  with pytest.raises(ValueError, match='resource kinds'):
    costs.penalty_tables(16, 8, 32, kinds=('latency',))
  with pytest.raises(ValueError, match='resource kinds'):
    costs.penalty_tables(16, 8, 32, kinds=())
  with pytest.raises(ValueError, match='cost transform'):
    costs.penalty_tables(16, 8, 32, transform='sqrt')
  # A single kind: the table is that kind's log cost alone.
  only_params = costs.penalty_tables(16, 8, 32, kinds=('params',))
  raw = darts.network_cost_tables(16, 8, 32)
  np.testing.assert_allclose(
      only_params['normal'], np.log(np.maximum(raw['normal'][..., 0], 1)).sum(0) / (8 * 14),
      rtol=1e-6)


def test_network_costs_of_one_hot_z_sum_the_picked_entries():
  geno = genotypes.SNAS_MODERATE
  z_n, z_r = (genotypes.cell_to_one_hot(geno.normal), genotypes.cell_to_one_hot(geno.reduce))
  tables = darts.network_cost_tables(16, 8, 32)
  want = np.zeros(3)
  for t, z in (('normal', z_n), ('reduce', z_r)):
    for cell in tables[t]:
      for e in range(NUM_EDGES):
        want += cell[e, int(np.argmax(z[e]))]
  got = costs.network_costs({'normal': z_n, 'reduce': z_r}, 16, 8, 32)
  assert set(got) == set(costs.COST_KINDS)
  # float32 einsum over ≤ 112 terms of ≤ 1e7: 1e-6 relative.
  np.testing.assert_allclose([float(got[k]) for k in costs.COST_KINDS], want, rtol=1e-6)
  # The moderate normal cell, per cell: 2 sep3 + 2 dil5 → params 2·800 + 2·656
  # at C = 16 (cells 0, 1), so the two first cells hold 2·2,912 parameters.
  first_two = sum(tables['normal'][i][e, int(np.argmax(z_n[e])), 0]
                  for i in range(2) for e in range(NUM_EDGES))
  assert first_two == 2 * (2 * 800 + 2 * 656)
  # softmax(α) gives the expectation, linear in Z.
  alpha = jnp.asarray(np.random.default_rng(3).normal(size=(NUM_EDGES, NUM_OPS)), jnp.float32)
  soft = costs.network_costs({'normal': jax.nn.softmax(alpha), 'reduce': jax.nn.softmax(alpha)}, 16, 8, 32)
  p = np.asarray(jax.nn.softmax(alpha), np.float64)
  want = sum(np.einsum('ek,nekj->j', p, tables[t]) for t in tables)
  np.testing.assert_allclose([float(soft[k]) for k in costs.COST_KINDS], want, rtol=1e-5)
