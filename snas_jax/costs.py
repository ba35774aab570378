"""Resource costs of the ops (params, FLOPs, memory access) and the penalty.

SNAS's resource constraint (section 2.4, eq. 9–11): E_Z[L + η·C(Z)] with C
linear in the one-hot Z, so it splits per edge: C(Z) = Σ_e Σ_k Z[e,k]·c[e,k].
The constants c come from each op's shape (the reference's formulas, tabled
in docs/algorithm.md §4).

Normalisation (so η means the same for any depth): C is the mean over the
network's cells and the edges of each, i.e. the cost of an average edge.
Each of the three costs enters as its log (clamped at 1, so `none` costs 0)
or its raw value, averaged over the chosen kinds.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from snas_jax import sampling, spaces

COST_KINDS = ('params', 'flops', 'mac')
ESTIMATORS = ('score', 'pathwise', 'exact')


def penalty_tables(c: int, layers: int, image_size: int, kinds=COST_KINDS,
                   transform: str = 'log', space=None) -> dict:
  """Per cell type, T[e, k] such that C(Z) = Σ_type Σ_e,k Z_type[e,k]·T_type[e,k]
  is the per-edge, per-cell mean cost. Returns {cell type: float32 [edges, ops]}
  of ``space`` (its ``cost_tables``)."""
  space = spaces.as_space(space)
  unknown = set(kinds) - set(COST_KINDS)
  if unknown or not kinds:
    raise ValueError(f'resource kinds must be a non-empty subset of {COST_KINDS}, got {kinds}')
  if transform not in ('log', 'linear'):
    raise ValueError(f'unknown cost transform {transform!r}; use log or linear')
  idx = [COST_KINDS.index(k) for k in kinds]
  out = {}
  tables = space.cost_tables(c, layers, image_size)
  total_cells = sum(len(t) for t in tables.values())  # NB201: 3N cells from N
  for cell_type, table in tables.items():
    chosen = table[..., idx]
    values = np.log(np.maximum(chosen, 1.0)) if transform == 'log' else chosen
    out[cell_type] = (values.mean(-1).sum(0) / (total_cells * space.num_edges)).astype(np.float32)
  return out


def resource_penalty(alpha, z_soft, z_hard, table, estimator: str = 'score'):
  """Surrogate whose α-gradient estimates ∇_α E_Z[C(Z)] for one cell type.

  alpha, z_soft, z_hard, table: [edges, ops]. Estimators:
  - 'score' (eq. 11, default): Σ_e ∇ log p(Z_e) · C_e(Z_e) on the discrete
    Gumbel-max sample; per-edge (local) credit, unbiased.
  - 'pathwise': C(soft Z), differentiated through the relaxed sample.
  - 'exact': Σ_k softmax(α)_k c_k, the expectation under Categorical(α).
  """
  if estimator == 'score':
    credit = jax.lax.stop_gradient((z_hard * table).sum(-1))  # [edges]
    return (sampling.categorical_log_prob(z_hard, alpha) * credit).sum()
  if estimator == 'pathwise':
    return (z_soft * table).sum()
  if estimator == 'exact':
    return (jax.nn.softmax(alpha, axis=-1) * table).sum()
  raise ValueError(f'unknown resource estimator {estimator!r}; use one of {ESTIMATORS}')


def expected_cost(alpha, table):
  """E_{Z ~ Cat(softmax α)} Σ Z·table: [..., edges, ops] -> scalar per leading index."""
  return (jax.nn.softmax(alpha, axis=-1) * table).sum((-2, -1))


def network_costs(z: dict, c: int, layers: int, image_size: int, space=None) -> dict:
  """Total params / FLOPs / MAC of the cells for edge weights Z {cell type:
  [edges, ops]} (one-hot Z: a derived child; softmax(α): the expectation).
  Cells only (no stem, head or preprocessing): what the architecture choice changes."""
  tables = spaces.as_space(space).cost_tables(c, layers, image_size)
  totals = sum(jnp.einsum('ek,nekj->j', jnp.asarray(z[t]), jnp.asarray(tables[t], jnp.float32))
               for t in tables)
  return dict(zip(COST_KINDS, totals))
