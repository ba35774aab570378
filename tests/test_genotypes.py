"""Tests for snas_jax.spaces.darts.genotypes: edge order, derivation rules, JSON, published cells."""
import json

import numpy as np
import pytest

from snas_jax.spaces.darts import genotypes
from snas_jax.spaces.darts.genotypes import EDGES, NUM_EDGES, NUM_OPS, PRIMITIVES

SEP3, SEP5, DIL3, DIL5 = 'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5'
MAX, AVG, SKIP = 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect'


def test_primitives_and_edge_order():
  assert PRIMITIVES == ('none', MAX, AVG, SKIP, SEP3, SEP5, DIL3, DIL5)
  # docs/algorithm.md §1: node by node; node i reads states 0 .. i+1.
  assert EDGES == ((0, 0), (0, 1),
                   (1, 0), (1, 1), (1, 2),
                   (2, 0), (2, 1), (2, 2), (2, 3),
                   (3, 0), (3, 1), (3, 2), (3, 3), (3, 4))
  assert NUM_EDGES == 14 and NUM_OPS == 8
  assert genotypes.CONCAT == (2, 3, 4, 5)
  slices = [genotypes.node_edge_slice(i) for i in range(4)]
  assert [(s.start, s.stop) for s in slices] == [(0, 2), (2, 5), (5, 9), (9, 14)]
  for node, s in enumerate(slices):
    assert EDGES[s] == tuple((node, state) for state in range(node + 2))
  assert genotypes.reduction_layers(8) == (2, 5)
  assert genotypes.reduction_layers(20) == (6, 13)
  assert genotypes.reduction_layers(5) == (1, 3)


def _alpha(rows):
  """α from {row: {op name: logit}}; unlisted logits are 0."""
  alpha = np.zeros((NUM_EDGES, NUM_OPS), np.float32)
  for r, logits in rows.items():
    for name, v in logits.items():
      alpha[r, PRIMITIVES.index(name)] = v
  return alpha


# Softmax weights of the non-`none` ops, worked out by hand (0 logits count 1):
#   row 0: none 5, sep3 2          -> SNAS drops it; DARTS keeps sep3 (2 edges)
#   row 1: dil3 1
#   row 2: skip 3        p = e³/(e³+7)            = 0.742
#   row 3: none 10, max 3 p = e³/(e¹⁰+e³+6)        = 0.0009 (larger logit than row 4!)
#   row 4: avg 2         p = e²/(e²+7)            = 0.514
#   row 5: sep5 1        p = e/(e+7)              = 0.280
#   row 6: dil5 4        p = e⁴/(e⁴+7)            = 0.886
#   row 7: none 4, sep3 3.9 p = e³·⁹/(e⁴+e³·⁹+6)   = 0.449 (argmax none)
#   row 8: all 0         p = 0.125, argmax none (first); DARTS op: max (first)
#   row 9: none 2        p = 1/(e²+7)             = 0.069
#   row 10: max 2        p = 0.514
#   row 11: sep3 2.5     p = e²·⁵/(e²·⁵+7)        = 0.635
#   row 12: skip 2.2     p = e²·²/(e²·²+7)        = 0.563
#   row 13: dil3 .5, avg .4 p = e·⁵/(e·⁵+e·⁴+6)    = 0.182
HAND_ALPHA = _alpha({
    0: {'none': 5, SEP3: 2}, 1: {DIL3: 1},
    2: {SKIP: 3}, 3: {'none': 10, MAX: 3}, 4: {AVG: 2},
    5: {SEP5: 1}, 6: {DIL5: 4}, 7: {'none': 4, SEP3: 3.9}, 8: {},
    9: {'none': 2}, 10: {MAX: 2}, 11: {SEP3: 2.5}, 12: {SKIP: 2.2}, 13: {DIL3: .5, AVG: .4},
})


def test_derive_snas_hand_built():
  """Argmax over all 8 ops per edge; an edge whose argmax is `none` is dropped."""
  assert genotypes.derive_snas(HAND_ALPHA) == (
      ((DIL3, 1),),                                   # row 0 argmax none: dropped
      ((SKIP, 0), (AVG, 2)),                          # row 3: dropped
      ((SEP5, 0), (DIL5, 1)),                         # rows 7, 8: dropped
      ((MAX, 1), (SEP3, 2), (SKIP, 3), (DIL3, 4)),    # row 9 dropped; 4 inputs kept
  )
  # A shift of a row's logits changes nothing.
  shifted = HAND_ALPHA + np.arange(NUM_EDGES, dtype=np.float32)[:, None]
  assert genotypes.derive_snas(shifted) == genotypes.derive_snas(HAND_ALPHA)


def test_derive_darts_hand_built():
  """Top-2 edges per node by their strongest non-`none` softmax weight; the op
  is the argmax excluding `none` (edges listed in input-state order)."""
  assert genotypes.derive_darts(HAND_ALPHA) == (
      ((SEP3, 0), (DIL3, 1)),    # only two edges: both kept, row 0 as sep3
      ((SKIP, 0), (AVG, 2)),     # 0.742, 0.514 beat row 3's 0.0009 (logit 3 > 2)
      ((DIL5, 1), (SEP3, 2)),    # 0.886, 0.449 (row 7 kept though argmax none)
      ((SEP3, 2), (SKIP, 3)),    # 0.635, 0.563
  )
  g = genotypes.derive(HAND_ALPHA, HAND_ALPHA, rule='darts')
  assert g.normal == g.reduce == genotypes.derive_darts(HAND_ALPHA)
  assert genotypes.derive(HAND_ALPHA, HAND_ALPHA).normal == genotypes.derive_snas(HAND_ALPHA)
  with pytest.raises(ValueError, match='derivation rule'):
    genotypes.derive(HAND_ALPHA, HAND_ALPHA, rule='enas')
  with pytest.raises(ValueError, match=r'alpha must be \[14, 8\]'):
    genotypes.derive_snas(np.zeros((14, 7)))


def test_cell_to_one_hot_inverts_derive_snas():
  rng = np.random.default_rng(0)
  alpha = rng.normal(size=(NUM_EDGES, NUM_OPS)).astype(np.float32)
  alpha[:, 0] = -10  # no `none` argmax: every edge present
  cell = genotypes.derive_snas(alpha)
  assert [len(n) for n in cell] == [2, 3, 4, 5]
  one_hot = genotypes.cell_to_one_hot(cell)
  assert one_hot.shape == (NUM_EDGES, NUM_OPS) and one_hot.dtype == np.float32
  np.testing.assert_array_equal(one_hot, np.eye(NUM_OPS)[np.argmax(alpha, -1)])
  assert genotypes.derive_snas(one_hot) == cell
  # And with absent edges: they become `none` rows, which derive drops again.
  cell = genotypes.derive_snas(HAND_ALPHA)
  one_hot = genotypes.cell_to_one_hot(cell)
  np.testing.assert_array_equal(np.argmax(one_hot, -1), [0, 6, 3, 0, 2, 5, 7, 0, 0, 0, 1, 4, 3, 6])
  assert genotypes.derive_snas(one_hot) == cell


def test_cell_to_one_hot_of_published_cells():
  z = genotypes.cell_to_one_hot(genotypes.SNAS_MILD.normal)
  assert z.sum() == NUM_EDGES and np.all(z.sum(-1) == 1)
  assert [PRIMITIVES[k] for k in np.argmax(z, -1)] == [
      SEP3, SEP3, SKIP, DIL3, 'none', SKIP, SKIP, 'none', 'none', SKIP, SEP3, 'none', 'none', 'none']
  # The aggressive reduce cell lists `none` edges explicitly: they stay none.
  z = genotypes.cell_to_one_hot(genotypes.SNAS_AGGRESSIVE.reduce)
  assert genotypes.derive_snas(z) == (((SEP5, 0),), ((SEP5, 0),), (), ())


@pytest.mark.parametrize('name', sorted(genotypes.PUBLISHED))
def test_json_round_trip_is_exact(name):
  g = genotypes.published(name)
  text = g.to_json()
  back = genotypes.Genotype.from_json(text)
  assert back == g
  assert back.normal == g.normal and back.reduce == g.reduce and back.concat == (2, 3, 4, 5)
  assert json.loads(back.to_json()) == json.loads(text)
  assert json.loads(text)['normal'][0] == [list(e) for e in g.normal[0]]


def test_json_from_hand_written_text():
  text = json.dumps({'normal': [[['sep_conv_3x3', 0], ['skip_connect', 1]], [], [['none', 2]],
                                [['dil_conv_5x5', 4]]],
                     'reduce': [[['max_pool_3x3', 0]], [['avg_pool_3x3', 2]], [], []]})
  g = genotypes.Genotype.from_json(text)
  assert g.normal == (((SEP3, 0), (SKIP, 1)), (), (('none', 2),), ((DIL5, 4),))
  assert g.reduce == (((MAX, 0),), ((AVG, 2),), (), ())
  assert g.concat == (2, 3, 4, 5)


def _bad(normal=None, reduce=None, drop=None):
  d = genotypes.SNAS_MILD.to_dict()
  if normal is not None:
    d['normal'] = normal
  if reduce is not None:
    d['reduce'] = reduce
  if drop:
    del d[drop]
  return json.dumps(d)


@pytest.mark.parametrize('text,words', [
    (_bad(normal=[[['sep_conv_7x7', 0]], [], [], []]), ['unknown op', "'sep_conv_7x7'", 'normal', 'node 0']),
    (_bad(reduce=[[], [['skip_connect', 3]], [], []]), ['input 3', 'reduce', 'node 1', 'states 0..2']),
    (_bad(normal=[[['skip_connect', -1]], [], [], []]), ['input -1', 'node 0']),
    (_bad(normal=[[['skip_connect', 1.0]], [], [], []]), ['input 1.0']),
    (_bad(normal=[[['skip_connect', True]], [], [], []]), ['input True']),
    (_bad(normal=[[], [], []]), ['expected 4 nodes, got 3', 'normal']),
    (_bad(reduce=[[]] * 5), ['expected 4 nodes, got 5', 'reduce']),
    (_bad(normal=[[['skip_connect', 0, 1]], [], [], []]), ['not an [op, input] pair']),
    (_bad(drop='reduce'), ["lacks ['reduce']"]),
])
def test_bad_json_raises_one_line_value_error(text, words):
  with pytest.raises(ValueError) as info:
    genotypes.Genotype.from_json(text)
  message = str(info.value)
  assert '\n' not in message
  for w in words:
    assert w in message, (w, message)


def test_published_cells_match_spec():
  g = genotypes.published('SNAS_mild')
  assert g.normal[0] == ((SEP3, 0), (SEP3, 1))
  assert g.normal[3] == ((SKIP, 0), (SEP3, 1))
  assert g.reduce[3] == ((MAX, 0), (DIL5, 2))
  g = genotypes.published('SNAS_moderate')
  assert g.normal[0] == ((DIL5, 0), (SKIP, 1))
  assert g.normal[3] == ((SEP3, 0), (DIL5, 1))
  assert g.reduce[1] == ((SEP5, 0), (DIL5, 1))
  assert g.reduce[3] == ((SEP5, 0), (SEP5, 1))
  g = genotypes.published('SNAS_aggressive')
  assert g.normal[2] == ((DIL5, 1), (SKIP, 0))
  assert g.reduce[0] == ((SEP5, 0), ('none', 1))
  assert g.reduce[2] == (('none', 1), ('none', 0))
  g = genotypes.published('DARTS_V2')
  assert g.normal[2] == ((SEP3, 1), (SKIP, 0))
  assert g.normal[3] == ((SKIP, 0), (DIL3, 2))
  assert g.reduce[1] == ((SKIP, 2), (MAX, 1))
  assert set(genotypes.PUBLISHED) == {'SNAS_mild', 'SNAS_moderate', 'SNAS_aggressive', 'DARTS_V2'}
  for g in genotypes.PUBLISHED.values():  # two edges per node in every published cell
    assert [len(n) for n in g.normal] == [2] * 4 and [len(n) for n in g.reduce] == [2] * 4
  with pytest.raises(ValueError, match="unknown architecture 'SNAS_extreme'"):
    genotypes.published('SNAS_extreme')


def test_cell_to_one_hot_rejects_two_edges_from_one_input():
  """A Genotype may list two ops from one input state (an evaluation network
  can build that), but a one-hot Z has one row per (node, input): the second
  edge must not overwrite the first silently."""
  cell = (((SEP3, 0), (SKIP, 0)), (), (), ())
  genotypes.Genotype(normal=cell, reduce=((), (), (), ()))  # accepted as a genotype
  with pytest.raises(ValueError, match='node 0 has two edges from input 0'):
    genotypes.cell_to_one_hot(cell)
