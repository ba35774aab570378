"""What a search space is, as one value: ``SearchSpace``.

A cell is a DAG: ``num_input_states`` input states (0 .. I−1), then
``num_nodes`` intermediate nodes (states I .. I+N−1). Intermediate node i
takes one edge from every earlier state, and a node is the sum of its
incoming edges (both spaces here). Edges are numbered node by node, inputs
in order: ``edges[row] = (node, state)``; α and Z are mappings from cell
type to an [edges, ops] array whose column k is ``op_names[k]``.

The DARTS space: 2 inputs, 4 nodes, 14 edges, output the concatenation of
the 4 nodes, cell types ('normal', 'reduce'). NAS-Bench-201: 1 input,
3 nodes, 6 edges, output the last node, one cell type ('cell').

What a space's builders take (so that the run loop needs no branch on the
space):

* ``search_network(c, layers, num_classes, **options)`` → a Linen module
  called ``(images [N,H,W,3], z: {cell type: [edges, ops]}, train)`` →
  logits [N, classes];
* ``child_network(genotype, c, layers, num_classes, **options)`` → a Linen
  module called ``(images, drop_rate, train)`` → (logits, aux logits or
  None);
* ``layers`` is the space's depth: the DARTS space's cell count, NB201's
  cells per stage (N);
* ``cost_tables(c, layers, image_size)`` → {cell type: [cells of that type,
  edges, ops, 3]}, (params, FLOPs, MAC) per op on every edge of every cell,
  with the conventions of docs/algorithm.md §4;
* ``derive_rules[rule](alpha: {cell type: [edges, ops]})`` → genotype;
* ``one_hot(genotype)`` → {cell type: [edges, ops]}: the derived child's Z;
* ``draw(genotype, folder, tag)`` → the paths written, one PNG per cell type
  (``<cell type>_<tag>.png``);
* the genotype type has ``to_json()`` and ``from_json(text)`` (NB201's also
  its arch string: ``str(arch)`` and ``from_string``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import numpy as np

CELL_OUTPUTS = ('concat', 'last')


@dataclasses.dataclass(frozen=True)
class Op:
  """One candidate operation of a space.

  ``module(c, stride, *, affine, name, **space options)``: the reference
  Flax module on an edge with ``c`` channels, or None for the zero op (never
  computed).
  ``cost(c, y_out, stride)``: (params, FLOPs, MAC). A backend's faster
  forms are not per op: they span a cell (``spaces/darts/search_model.Forms``).
  """
  module: Callable[..., Any]
  cost: Callable[[int, int, int], tuple]


def dag_edges(num_input_states: int, num_nodes: int) -> tuple:
  """(node, state) of every edge, node by node: intermediate node i reads states 0 .. I+i−1."""
  return tuple((node, state) for node in range(num_nodes)
               for state in range(node + num_input_states))


def dag_edge_batches(num_input_states: int, num_nodes: int) -> tuple:
  """The edges grouped by the states they leave: ((sources, destinations, rows), ...).

  Edge g of a batch reads state ``sources[g % S]`` and feeds intermediate node
  ``destinations[g // S]``; ``rows[g]`` is its row in α / Z. The first batch
  holds every edge leaving a cell input (they need no intermediate node), then
  one batch per intermediate node but the last, its edges to the later nodes:
  after batch b, intermediate node b has all its inputs.
  """
  edges = dag_edges(num_input_states, num_nodes)
  row = {edge: r for r, edge in enumerate(edges)}
  inputs, nodes = tuple(range(num_input_states)), tuple(range(num_nodes))
  batches = [(inputs, nodes, tuple(row[(d, s)] for d in nodes for s in inputs))]
  for node in range(num_nodes - 1):
    state = node + num_input_states
    dests = tuple(range(node + 1, num_nodes))
    batches.append(((state,), dests, tuple(row[(d, state)] for d in dests)))
  return tuple(batches)


# eq=False: a space is compared by identity, hashable, and can be a static
# argument of jax.jit.
@dataclasses.dataclass(frozen=True, eq=False)
class SearchSpace:
  """A cell search space and everything built from it (see the module docstring)."""
  name: str
  ops: Mapping[str, Op]  # in column order of α / Z
  zero_op: str  # the op that removes its edge (its module is None: never computed)
  num_input_states: int
  num_nodes: int
  cell_output: str  # 'concat': the intermediate nodes concatenated; 'last': the last node
  cell_types: tuple
  genotype_type: type
  search_network: Callable[..., Any]
  child_network: Callable[..., Any]
  derive_rules: Mapping[str, Callable[[Mapping[str, np.ndarray]], Any]]
  cost_tables: Callable[[int, int, int], dict]
  draw: Callable[[Any, str, str], list]
  one_hot: Callable[[Any], dict]  # genotype -> its one-hot Z {cell type: [edges, ops]}
  # (layers, image_size) -> None; a one-line ValueError for a depth or image
  # size the space's networks cannot take.
  check_network: Callable[[int, int], None]
  # The genotype a retraining's --arch names (a published cell, an arch string).
  genotype_from_flag: Callable[[str], Any]

  def __post_init__(self):
    if self.cell_output not in CELL_OUTPUTS:
      raise ValueError(f'space {self.name}: cell_output {self.cell_output!r} is not one of '
                       f'{CELL_OUTPUTS}')
    if self.zero_op not in self.ops:
      raise ValueError(f'space {self.name}: zero_op {self.zero_op!r} is not one of its ops')

  @property
  def op_names(self) -> tuple:
    return tuple(self.ops)

  @property
  def num_ops(self) -> int:
    return len(self.ops)

  @functools.cached_property
  def edges(self) -> tuple:
    return dag_edges(self.num_input_states, self.num_nodes)

  @property
  def num_edges(self) -> int:
    return len(self.edges)

  @functools.cached_property
  def edge_batches(self) -> tuple:
    return dag_edge_batches(self.num_input_states, self.num_nodes)

  @property
  def arch_shape(self) -> tuple:
    """The shape of α and Z of one cell type: (edges, ops)."""
    return (self.num_edges, self.num_ops)

  def check_arch_weights(self, weights: Mapping[str, Any], what: str = 'z') -> None:
    """One-line ValueError unless ``weights`` maps exactly this space's cell
    types to [edges, ops] arrays."""
    if set(weights) != set(self.cell_types):
      raise ValueError(f'{what} must map the cell types {list(self.cell_types)} of the '
                       f'{self.name} space to [{self.num_edges}, {self.num_ops}] arrays, '
                       f'got {sorted(weights)}')
    for cell_type in self.cell_types:
      shape = tuple(np.shape(weights[cell_type]))
      if shape != self.arch_shape:
        raise ValueError(f'{what}[{cell_type!r}] must be [{self.num_edges}, {self.num_ops}] '
                         f'in the {self.name} space, got {list(shape)}')

  def derive(self, alpha: Mapping[str, Any], rule: str):
    """The genotype that derivation rule ``rule`` reads from α {cell type: [edges, ops]}."""
    if rule not in self.derive_rules:
      raise ValueError(f'unknown derivation rule {rule!r} in the {self.name} space; use one of '
                       f'{", ".join(self.derive_rules)}')
    self.check_arch_weights(alpha, 'alpha')
    return self.derive_rules[rule](alpha)
