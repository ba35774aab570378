"""Resource costs of the ops (params, FLOPs, memory access) and the penalty.

SNAS's resource constraint (section 2.4, eq. 9–11): E_Z[L + η·C(Z)] with C
linear in the one-hot Z, so it splits per edge: C(Z) = Σ_e Σ_k Z[e,k]·c[e,k].
The constants c come from each op's shape (the reference's formulas, tabled
in docs/algorithm.md §4).

Normalisation (so η means the same for any depth): C is the mean over the
network's cells and the 14 edges of each, i.e. the cost of an average edge.
Each of the three costs enters as its log (clamped at 1, so `none` costs 0)
or its raw value, averaged over the chosen kinds.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from snas_jax import sampling
from snas_jax.genotypes import (EDGES, NUM_EDGES, NUM_INPUT_STATES, NUM_OPS, PRIMITIVES,
                                reduction_layers)

COST_KINDS = ('params', 'flops', 'mac')
ESTIMATORS = ('score', 'pathwise', 'exact')


def op_cost(name: str, c: int, y: int, stride: int) -> tuple:
  """(params, FLOPs, MAC) of one op with C channels and output side y (docs/algorithm.md §4)."""
  area = y * y
  if name == 'none':
    return 0, 0, 0
  if name in ('max_pool_3x3', 'avg_pool_3x3'):
    return 0, 9 * area * c, (2 if stride == 1 else 5) * area * c
  if name == 'skip_connect':
    if stride == 1:
      return 0, 0, 2 * area * c
    size = 2 * c * (c // 2)  # FactorizedReduce: two 1x1 convs C -> C/2
    return size, size * area, 2 * area * (4 * c + c // 2) + size
  k = int(name[-1])
  if name.startswith('sep_conv'):
    size = 2 * c * k * k + 2 * c * c
    return size, size * area, area * ((7 if stride == 1 else 10) * c + c) + size
  if name.startswith('dil_conv'):
    size = c * k * k + c * c
    return size, size * area, area * ((3 if stride == 1 else 6) * c + c) + size
  raise ValueError(f'unknown op {name!r}')


def cell_cost_table(c: int, y_out: int, reduction: bool) -> np.ndarray:
  """[14, 8, 3] (params, FLOPs, MAC) of every op on every edge of one cell."""
  table = np.zeros((NUM_EDGES, NUM_OPS, len(COST_KINDS)), np.float64)
  for e, (_, state) in enumerate(EDGES):
    stride = 2 if reduction and state < NUM_INPUT_STATES else 1
    for k, name in enumerate(PRIMITIVES):
      table[e, k] = op_cost(name, c, y_out, stride)
  return table


def network_cost_tables(c: int, layers: int, image_size: int) -> dict:
  """{'normal': [n_normal, 14, 8, 3], 'reduce': [n_reduce, 14, 8, 3]} per cell."""
  tables = {'normal': [], 'reduce': []}
  y, c_cell = image_size, c
  for i in range(layers):
    reduction = i in reduction_layers(layers)
    if reduction:
      c_cell, y = 2 * c_cell, y // 2
    tables['reduce' if reduction else 'normal'].append(cell_cost_table(c_cell, y, reduction))
  return {k: np.stack(v) if v else np.zeros((0, NUM_EDGES, NUM_OPS, len(COST_KINDS)))
          for k, v in tables.items()}


def penalty_tables(c: int, layers: int, image_size: int, kinds=COST_KINDS,
                   transform: str = 'log') -> dict:
  """Per cell type, T[e, k] such that C(Z) = Σ_type Σ_e,k Z_type[e,k]·T_type[e,k]
  is the per-edge, per-cell mean cost. Returns {'normal','reduce'}: float32 [14, 8]."""
  unknown = set(kinds) - set(COST_KINDS)
  if unknown or not kinds:
    raise ValueError(f'resource kinds must be a non-empty subset of {COST_KINDS}, got {kinds}')
  if transform not in ('log', 'linear'):
    raise ValueError(f'unknown cost transform {transform!r}; use log or linear')
  idx = [COST_KINDS.index(k) for k in kinds]
  out = {}
  for cell_type, table in network_cost_tables(c, layers, image_size).items():
    chosen = table[..., idx]
    values = np.log(np.maximum(chosen, 1.0)) if transform == 'log' else chosen
    out[cell_type] = (values.mean(-1).sum(0) / (layers * NUM_EDGES)).astype(np.float32)
  return out


def resource_penalty(alpha, z_soft, z_hard, table, estimator: str = 'score'):
  """Surrogate whose α-gradient estimates ∇_α E_Z[C(Z)] for one cell type.

  alpha, z_soft, z_hard, table: [14, 8]. Estimators:
  - 'score' (eq. 11, default): Σ_e ∇ log p(Z_e) · C_e(Z_e) on the discrete
    Gumbel-max sample; per-edge (local) credit, unbiased.
  - 'pathwise': C(soft Z), differentiated through the relaxed sample.
  - 'exact': Σ_k softmax(α)_k c_k, the expectation under Categorical(α).
  """
  if estimator == 'score':
    credit = jax.lax.stop_gradient((z_hard * table).sum(-1))  # [14]
    return (sampling.categorical_log_prob(z_hard, alpha) * credit).sum()
  if estimator == 'pathwise':
    return (z_soft * table).sum()
  if estimator == 'exact':
    return (jax.nn.softmax(alpha, axis=-1) * table).sum()
  raise ValueError(f'unknown resource estimator {estimator!r}; use one of {ESTIMATORS}')


def expected_cost(alpha, table):
  """E_{Z ~ Cat(softmax α)} Σ Z·table: [..., 14, 8] -> scalar per leading index."""
  return (jax.nn.softmax(alpha, axis=-1) * table).sum((-2, -1))


def network_costs(z_normal, z_reduce, c: int, layers: int, image_size: int) -> dict:
  """Total params / FLOPs / MAC of the cells for edge weights Z (one-hot Z: a
  derived child; softmax(α): the expectation). Cells only (no stem, head or
  preprocessing): what the architecture choice changes."""
  tables = network_cost_tables(c, layers, image_size)
  z = {'normal': jnp.asarray(z_normal), 'reduce': jnp.asarray(z_reduce)}
  totals = sum(jnp.einsum('ek,nekj->j', z[t], jnp.asarray(tables[t], jnp.float32))
               for t in tables)
  return dict(zip(COST_KINDS, totals))
