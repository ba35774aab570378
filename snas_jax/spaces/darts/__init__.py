"""The DARTS cell space as a value: ``SPACE``.

8 ops (``genotypes.PRIMITIVES``), 2 input states, 4 intermediate nodes,
14 edges, the cell's output the concatenation of its nodes, two cell types
(normal and reduction). Its files: ``genotypes.py`` (the vocabulary,
``Genotype``, the derivation rules, the published cells), ``ops.py`` (the
reference op of each name, ``make_op``), ``search_model.py`` (the search
network, ``SearchNetwork``, its cells and their ``Forms``),
``child_model.py`` (the child networks, ``NetworkCIFAR``,
``NetworkImageNet``), ``drawing.py`` (the cell drawing) and this module
(the cost of each op, docs/algorithm.md §4, and ``SPACE``, which puts
them together).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from snas_jax.spaces.base import Op, SearchSpace
from snas_jax.spaces.darts import child_model, drawing, genotypes, ops, search_model
from snas_jax.spaces.darts.genotypes import (CELL_TYPES, EDGES, NUM_EDGES, NUM_INPUT_STATES,
                                             NUM_OPS, PRIMITIVES, reduction_layers)

COST_KINDS = 3  # params, FLOPs, MAC


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
  table = np.zeros((NUM_EDGES, NUM_OPS, COST_KINDS), np.float64)
  for e, (_, state) in enumerate(EDGES):
    stride = 2 if reduction and state < NUM_INPUT_STATES else 1
    for k, name in enumerate(PRIMITIVES):
      table[e, k] = op_cost(name, c, y_out, stride)
  return table


def network_cost_tables(c: int, layers: int, image_size: int) -> dict:
  """{'normal': [n_normal, 14, 8, 3], 'reduce': [n_reduce, 14, 8, 3]} per cell."""
  tables = {t: [] for t in CELL_TYPES}
  y, c_cell = image_size, c
  for i in range(layers):
    reduction = i in reduction_layers(layers)
    if reduction:
      c_cell, y = 2 * c_cell, y // 2
    tables['reduce' if reduction else 'normal'].append(cell_cost_table(c_cell, y, reduction))
  return {k: np.stack(v) if v else np.zeros((0, NUM_EDGES, NUM_OPS, COST_KINDS))
          for k, v in tables.items()}


def _op(op: str) -> Op:
  def module(c, stride, *, affine=True, name=None):
    return ops.make_op(op, c, stride, affine=affine, op_name=name)
  name = op
  return Op(module=module, cost=lambda c, y_out, stride: op_cost(name, c, y_out, stride))


OPS = {name: _op(name) for name in PRIMITIVES}


def check_network(layers: int, image_size: int) -> None:
  """A normal cell and the image halved by each reduction cell."""
  if layers < genotypes.MIN_LAYERS:
    raise ValueError(f'--layers={layers} has no normal cell (reduction cells sit at L//3 '
                     f'and 2L//3), so α_normal would never be trained; use --layers >= '
                     f'{genotypes.MIN_LAYERS}')
  reductions = len(reduction_layers(layers))
  if image_size % 2 ** reductions:
    raise ValueError(f'--image_size={image_size} is too small or odd for the '
                     f'{reductions} reduction cells, which halve it {reductions} times; use '
                     f'a multiple of {2 ** reductions} that divides 32 (e.g. 8, 16, 32)')


def build_search_network(c: int, layers: int, num_classes: int, *, drop_path: float = 0.0,
                         remat: bool = False, dtype=jnp.float32) -> search_model.SearchNetwork:
  return search_model.SearchNetwork(c=c, num_classes=num_classes, layers=layers,
                                    drop_path=drop_path, remat=remat, dtype=jnp.dtype(dtype))


def build_child_network(genotype: genotypes.Genotype, c: int, layers: int, num_classes: int,
                        **options) -> child_model.NetworkCIFAR:
  return child_model.NetworkCIFAR(genotype, c, layers, num_classes, **options)


def _derive(rule: str):
  return lambda alpha: genotypes.derive(np.asarray(alpha['normal']),
                                        np.asarray(alpha['reduce']), rule)


def one_hot(genotype: genotypes.Genotype) -> dict:
  """The genotype as one-hot Z {'normal', 'reduce'}: [14, 8]."""
  return {t: genotypes.cell_to_one_hot(getattr(genotype, t)) for t in CELL_TYPES}


SPACE = SearchSpace(
    name='darts',
    ops=OPS,
    zero_op='none',
    num_input_states=NUM_INPUT_STATES,
    num_nodes=genotypes.NUM_NODES,
    cell_output='concat',
    cell_types=CELL_TYPES,
    genotype_type=genotypes.Genotype,
    search_network=build_search_network,
    child_network=build_child_network,
    derive_rules={'snas': _derive('snas'), 'darts': _derive('darts')},
    cost_tables=network_cost_tables,
    draw=drawing.draw,
    one_hot=one_hot,
    check_network=check_network,
    genotype_from_flag=genotypes.published,
)
