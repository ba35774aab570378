"""The DARTS cell's vocabulary: operation names, edges, genotypes, published cells.

A cell has 2 input states (0, 1) and 4 intermediate nodes (states 2..5).
Intermediate node i takes one edge from every earlier state, so the cell has
2 + 3 + 4 + 5 = 14 edges, ordered node by node (docs/algorithm.md §1). Architecture
logits α are [NUM_EDGES, NUM_OPS] arrays whose column k is ``PRIMITIVES[k]``.

A ``Genotype`` is a derived (normal, reduce) cell pair. It keeps, per node,
the list of (op name, input state) it was derived with. SNAS derivation keeps
every edge whose argmax is not ``none`` (so a node may have 0..i+2 inputs);
DARTS derivation keeps the top-2 edges per node. One JSON format serves both.
"""
from __future__ import annotations

import functools

import dataclasses
import json
from typing import Sequence

import numpy as np

PRIMITIVES = (
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
)
NUM_OPS = len(PRIMITIVES)
NUM_INPUT_STATES = 2
NUM_NODES = 4
# (node, input state) for every edge, node by node: ((0,0),(0,1),(1,0),...).
EDGES = tuple((node, state) for node in range(NUM_NODES)
              for state in range(node + NUM_INPUT_STATES))
NUM_EDGES = len(EDGES)  # 14
CONCAT = tuple(range(NUM_INPUT_STATES, NUM_INPUT_STATES + NUM_NODES))  # (2, 3, 4, 5)
CELL_TYPES = ('normal', 'reduce')  # the keys of α and Z, the cells of a Genotype


# The smallest network with a normal cell (reductions at L//3 and 2L//3).
MIN_LAYERS = 3


def reduction_layers(layers: int) -> tuple:
  """Indices of the reduction cells of an L-cell network: L//3 and 2L//3 (docs/algorithm.md §1)."""
  return tuple(sorted({layers // 3, 2 * layers // 3}))


def node_edge_slice(node: int) -> slice:
  """The rows of α / Z that hold the edges into intermediate node ``node``."""
  start = sum(n + NUM_INPUT_STATES for n in range(node))
  return slice(start, start + node + NUM_INPUT_STATES)


Cell = tuple  # tuple[tuple[tuple[str, int], ...], ...]: per node, (op, input) pairs


@functools.lru_cache(maxsize=None)
def edge_batches() -> tuple:
  """The cell's edges grouped by the states they leave: ((sources, destinations, rows), ...).

  Edge ``g`` of a batch reads state ``sources[g % S]`` and feeds node
  ``destinations[g // S]``; ``rows[g]`` is its row in α / Z. Four batches: the
  8 edges leaving the two cell inputs (they need no intermediate node), then
  the 3, 2 and 1 edges leaving nodes 0, 1 and 2; batch b completes node b.
  """
  inputs, first_nodes = tuple(range(NUM_INPUT_STATES)), tuple(range(NUM_NODES))
  batches = [(inputs, first_nodes,
              tuple(node_edge_slice(d).start + s for d in first_nodes for s in inputs))]
  for node in range(NUM_NODES - 1):
    state = node + NUM_INPUT_STATES
    dests = tuple(range(node + 1, NUM_NODES))
    batches.append(((state,), dests, tuple(node_edge_slice(d).start + state for d in dests)))
  return tuple(batches)


def _check_cell(cell, which: str) -> tuple:
  """Validates a cell description and returns it as nested tuples."""
  if len(cell) != NUM_NODES:
    raise ValueError(f'genotype {which}: expected {NUM_NODES} nodes, got {len(cell)}; '
                     f'write one list of [op, input] pairs per intermediate node')
  out = []
  for node, edges in enumerate(cell):
    node_edges = []
    for edge in edges:
      if len(edge) != 2:
        raise ValueError(f'genotype {which} node {node}: edge {edge!r} is not an [op, input] pair')
      op, state = edge
      if op not in PRIMITIVES:
        raise ValueError(f'genotype {which} node {node}: unknown op {op!r}; '
                         f'choose one of {", ".join(PRIMITIVES)}')
      if (not isinstance(state, (int, np.integer)) or isinstance(state, bool)
          or not 0 <= state < node + NUM_INPUT_STATES):
        raise ValueError(f'genotype {which} node {node}: input {state!r} is not a valid state; '
                         f'node {node} reads states 0..{node + NUM_INPUT_STATES - 1}')
      node_edges.append((str(op), int(state)))
    out.append(tuple(node_edges))
  return tuple(out)


def _check_concat(concat) -> tuple:
  """Validates the states a cell concatenates as its output: distinct
  intermediate nodes (2..5); the inputs 0, 1 have another size in a
  reduction cell."""
  if isinstance(concat, (str, bytes)) or not hasattr(concat, '__iter__'):
    raise ValueError(f'genotype concat {concat!r} is not a list of states')
  items = list(concat)
  nodes = set(CONCAT)
  if (not items or len(set(map(repr, items))) != len(items)
      or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c not in nodes
             for c in items)):
    raise ValueError(f'genotype concat {items!r}: expected distinct intermediate nodes among '
                     f'{", ".join(map(str, CONCAT))} (states 0 and 1 are the cell\'s inputs), '
                     f'e.g. {list(CONCAT)}')
  return tuple(int(c) for c in items)


@dataclasses.dataclass(frozen=True)
class Genotype:
  """A derived cell pair. ``normal``/``reduce``: per node, ((op, input), ...)."""
  normal: Cell
  reduce: Cell
  concat: tuple = CONCAT

  def __post_init__(self):
    object.__setattr__(self, 'normal', _check_cell(self.normal, 'normal'))
    object.__setattr__(self, 'reduce', _check_cell(self.reduce, 'reduce'))
    object.__setattr__(self, 'concat', _check_concat(self.concat))

  def to_dict(self) -> dict:
    as_lists = lambda cell: [[[op, s] for op, s in node] for node in cell]
    return {'normal': as_lists(self.normal), 'reduce': as_lists(self.reduce),
            'concat': list(self.concat)}

  @classmethod
  def from_dict(cls, d: dict) -> 'Genotype':
    missing = {'normal', 'reduce'} - set(d)
    if missing:
      raise ValueError(f'genotype JSON lacks {sorted(missing)}; expected keys normal, reduce')
    return cls(normal=d['normal'], reduce=d['reduce'], concat=tuple(d.get('concat', CONCAT)))

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_json(cls, text: str) -> 'Genotype':
    return cls.from_dict(json.loads(text))


def cell_to_one_hot(cell: Cell) -> np.ndarray:
  """A cell as a one-hot [14, 8] edge-weight matrix (absent edges are `none`)."""
  z = np.zeros((NUM_EDGES, NUM_OPS), np.float32)
  z[:, 0] = 1.0
  seen = set()
  for node, edges in enumerate(cell):
    for op, state in edges:
      row = EDGES.index((node, state))
      if row in seen:  # a search cell has one edge per (node, input): don't drop one silently
        raise ValueError(f'cell node {node} has two edges from input {state}; '
                         f'a one-hot Z holds one op per (node, input) edge')
      seen.add(row)
      z[row] = 0.0
      z[row, PRIMITIVES.index(op)] = 1.0
  return z


def derive_snas(alpha: np.ndarray) -> Cell:
  """SNAS rule (docs/algorithm.md §6): argmax over all 8 ops on every edge; `none` drops it."""
  alpha = np.asarray(alpha)
  _check_alpha(alpha)
  cell = []
  for node in range(NUM_NODES):
    edges = []
    for row in range(NUM_EDGES)[node_edge_slice(node)]:
      k = int(np.argmax(alpha[row]))
      if PRIMITIVES[k] != 'none':
        edges.append((PRIMITIVES[k], EDGES[row][1]))
    cell.append(tuple(edges))
  return tuple(cell)


def derive_darts(alpha: np.ndarray, k: int = 2) -> Cell:
  """DARTS rule: per node the top-k edges by their strongest non-`none` weight.

  ``alpha`` must be logits: DARTS ranks edges by softmax(α) (which differs from
  ranking logits), and the softmax is taken here. Passing softmax weights would
  apply it twice, which can reorder edges across rows.
  """
  alpha = np.asarray(alpha, np.float64)
  _check_alpha(alpha)
  weights = np.exp(alpha - alpha.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  cell = []
  for node in range(NUM_NODES):
    rows = list(range(NUM_EDGES)[node_edge_slice(node)])
    strength = [weights[r, 1:].max() for r in rows]
    # Stable sort: ties go to the earlier input state.
    best = sorted(range(len(rows)), key=lambda i: -strength[i])[:k]
    edges = []
    for i in sorted(best):
      r = rows[i]
      op = 1 + int(np.argmax(weights[r, 1:]))
      edges.append((PRIMITIVES[op], EDGES[r][1]))
    cell.append(tuple(edges))
  return tuple(cell)


def _check_alpha(alpha):
  if alpha.shape != (NUM_EDGES, NUM_OPS):
    raise ValueError(f'alpha must be [{NUM_EDGES}, {NUM_OPS}], got {list(alpha.shape)}')


def derive(alpha_normal, alpha_reduce, rule: str = 'snas') -> Genotype:
  rules = {'snas': derive_snas, 'darts': derive_darts}
  if rule not in rules:
    raise ValueError(f'unknown derivation rule {rule!r}; use snas or darts')
  return Genotype(normal=rules[rule](alpha_normal), reduce=rules[rule](alpha_reduce))


def _published(normal: Sequence, reduce: Sequence) -> Genotype:
  names = {'sep3': 'sep_conv_3x3', 'sep5': 'sep_conv_5x5', 'dil3': 'dil_conv_3x3',
           'dil5': 'dil_conv_5x5', 'max': 'max_pool_3x3', 'avg': 'avg_pool_3x3',
           'skip': 'skip_connect', 'none': 'none'}
  expand = lambda cell: [[(names[op], s) for op, s in node] for node in cell]
  return Genotype(normal=expand(normal), reduce=expand(reduce))


# The published cells (docs/algorithm.md §6), exactly as the papers print them.
SNAS_MILD = _published(
    normal=[[('sep3', 0), ('sep3', 1)], [('skip', 0), ('dil3', 1)],
            [('skip', 0), ('skip', 1)], [('skip', 0), ('sep3', 1)]],
    reduce=[[('max', 0), ('max', 1)], [('max', 1), ('skip', 2)],
            [('max', 1), ('skip', 2)], [('max', 0), ('dil5', 2)]])
SNAS_MODERATE = _published(
    normal=[[('dil5', 0), ('skip', 1)], [('sep3', 0), ('skip', 1)],
            [('skip', 0), ('skip', 1)], [('sep3', 0), ('dil5', 1)]],
    reduce=[[('max', 0), ('max', 1)], [('sep5', 0), ('dil5', 1)],
            [('sep5', 0), ('sep5', 1)], [('sep5', 0), ('sep5', 1)]])
SNAS_AGGRESSIVE = _published(
    normal=[[('sep5', 0), ('skip', 1)], [('skip', 0), ('skip', 1)],
            [('dil5', 1), ('skip', 0)], [('skip', 0), ('dil5', 1)]],
    reduce=[[('sep5', 0), ('none', 1)], [('sep5', 0), ('none', 1)],
            [('none', 1), ('none', 0)], [('none', 1), ('none', 0)]])
DARTS_V2 = _published(
    normal=[[('sep3', 0), ('sep3', 1)], [('sep3', 0), ('sep3', 1)],
            [('sep3', 1), ('skip', 0)], [('skip', 0), ('dil3', 2)]],
    reduce=[[('max', 0), ('max', 1)], [('skip', 2), ('max', 1)],
            [('max', 0), ('skip', 2)], [('skip', 2), ('max', 1)]])

PUBLISHED = {'SNAS_mild': SNAS_MILD, 'SNAS_moderate': SNAS_MODERATE,
             'SNAS_aggressive': SNAS_AGGRESSIVE, 'DARTS_V2': DARTS_V2}


def published(name: str) -> Genotype:
  if name not in PUBLISHED:
    raise ValueError(f'unknown architecture {name!r}; choose one of {", ".join(PUBLISHED)}')
  return PUBLISHED[name]
