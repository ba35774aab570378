"""The NAS-Bench-201 space (snas_jax/spaces/nb201.py) against AutoDL-Projects (xautodl 1.0.0).

tests/data/nb201_golden.npz holds xautodl's numbers (experiments/nb201_golden.py
writes it): a tiny supernet (cell BNs with and without running statistics) and
a tiny TinyNetwork with copied weights (logits, loss, every gradient, dL/dZ, BN
running statistics, evaluation logits), and TinyNetwork's parameter and FLOP
counts at NB201's C = 16, N = 5. The golden tests need no torch; where torch
and xautodl are importable, they are also compared live. Then arch strings,
derivation, costs and the space value.
"""
import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, load_experiment
from snas_jax import spaces, train
from snas_jax.spaces.darts import genotypes
from snas_jax.spaces import nb201
from snas_jax.spaces.base import dag_edge_batches, dag_edges
from snas_jax.spaces.nb201 import Arch
from test_pytorch_fidelity import _jit, mismatches


gen = load_experiment('nb201_golden')  # imports torch only when it generates

# tests/test_pytorch_fidelity.py's tolerances, by the same float32 reasoning.
# Observed |ours − xautodl| on these networks: ≤ 1.3e-6 on gradients,
# ≤ 3e-7 on logits, ≤ 6e-7 on dL/dZ, ≤ 1.8e-7 on running statistics,
# ≤ 2.4e-7 on the loss: the tolerances leave 7x or more.
TOLERANCES = {  # quantity: (rtol, atol)
    'loss': (1e-5, 5e-6),
    'logits': (1e-5, 5e-6),
    'grads': (1e-5, 1e-5),
    'grad_z': (1e-5, 1e-5),
    'new_batch_stats': (1e-5, 2e-6),
    'eval_logits': (1e-5, 5e-6),
}
INPUTS = ('image', 'label', 'z', 'params', 'batch_stats')
SPACE = spaces.get('nb201')


@functools.cache
def _search_pass(track_running_stats: bool):
  cfg = gen.SEARCH
  net = SPACE.search_network(cfg['c'], cfg['n'], gen.CLASSES, track_running_stats)

  def run(params, batch_stats, image, label, z):
    with jax.default_matmul_precision('highest'):
      def loss_fn(params, z):
        logits, new = net.apply({'params': params, 'batch_stats': batch_stats}, image,
                                {'cell': z}, True, mutable=['batch_stats'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
        return loss, (logits, new['batch_stats'])

      (loss, (logits, new_stats)), (grads, grad_z) = jax.value_and_grad(
          loss_fn, (0, 1), has_aux=True)(params, z)
      eval_logits = net.apply({'params': params, 'batch_stats': new_stats}, image, {'cell': z},
                              False)
    return {'loss': loss, 'logits': logits, 'grads': grads, 'grad_z': grad_z,
            'new_batch_stats': new_stats, 'eval_logits': eval_logits}

  return _jit(run)


@functools.cache
def _child_pass():
  cfg = gen.CHILD
  net = SPACE.child_network(Arch.from_string(gen.CHILD_ARCH), cfg['c'], cfg['n'], gen.CLASSES)

  def run(params, batch_stats, image, label):
    with jax.default_matmul_precision('highest'):
      def loss_fn(params):
        (logits, aux), new = net.apply({'params': params, 'batch_stats': batch_stats}, image,
                                       jnp.float32(0), True, mutable=['batch_stats'])
        assert aux is None
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
        return loss, (logits, new['batch_stats'])

      (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      eval_logits, _ = net.apply({'params': params, 'batch_stats': new_stats}, image,
                                 jnp.float32(0), False)
    return {'loss': loss, 'logits': logits, 'grads': grads, 'new_batch_stats': new_stats,
            'eval_logits': eval_logits}

  return _jit(run)


def ours(name: str, case: dict) -> dict:
  if name.startswith('search'):
    out = _search_pass(name == 'search')(case['params'], case['batch_stats'], case['image'],
                                         case['label'], case['z'])
  else:
    out = _child_pass()(case['params'], case['batch_stats'], case['image'], case['label'])
  return jax.tree.map(np.asarray, out)


def _assert_agree(got, want, tolerances, what):
  bad = mismatches(got, want, tolerances)
  assert not bad, f'{what}: {len(bad)} arrays differ:\n' + '\n'.join(bad[:20])


@pytest.fixture(scope='module')
def golden():
  return gen.load()


@pytest.mark.parametrize('name', ['search', 'search_untracked', 'child'])
def test_matches_autodl_golden(golden, name):
  case = golden[name]
  assert set(TOLERANCES) - ({'grad_z'} if name == 'child' else set()) <= set(case)
  # Every parameter has its gradient, and the trees have the same leaves as this code's.
  assert len(gen.flatten(case['grads'])) == len(gen.flatten(case['params'])) > 10
  _assert_agree(ours(name, case), case, TOLERANCES, f'NB201 {name} network vs xautodl (golden)')


# ----------------------------------------------------------------------------
# Parameter and multiply-add counts at NB201's C = 16, N = 5.


@functools.cache
def _counts(arch: str, classes: int) -> tuple:
  """(parameters, multiply-adds per 32x32 image) of this code's child, by tracing only: one
  trace of init + inference (the initialisers draw with no convolution or dot)."""
  net = SPACE.child_network(Arch.from_string(arch), gen.COUNT_C, gen.COUNT_N, classes)
  size = gen.COUNT_IMAGE_SIZE
  jaxpr, (_, variables) = jax.make_jaxpr(
      lambda x: net.init_with_output(jax.random.key(0), x, jnp.float32(0), False),
      return_shape=True)(jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return train.count_params(variables['params']), train._jaxpr_multiply_adds(jaxpr.jaxpr)


def test_params_and_multiply_adds_match_tinynetwork(golden):
  """xautodl's FLOPs count the classifier's bias adds too: ours + classes."""
  counts = golden['counts']
  assert counts['params'].shape == (len(gen.COUNT_ARCHS), len(gen.COUNT_CLASSES))
  got_params, got_flops = np.zeros_like(counts['params']), np.zeros_like(counts['flops'])
  for (a, arch), (k, classes) in itertools.product(enumerate(gen.COUNT_ARCHS),
                                                   enumerate(gen.COUNT_CLASSES)):
    params, madds = _counts(arch, classes)
    got_params[a, k], got_flops[a, k] = params, madds + classes
  np.testing.assert_array_equal(got_params, counts['params'])
  np.testing.assert_array_equal(got_flops, counts['flops'])
  # NB201's published size of the all-conv-3x3 cell on CIFAR-10: 1.5316 MB, 220.11 MFLOPs.
  assert counts['params'][0, 0] == 1_531_546 and round(counts['flops'][0, 0] / 1e4) == 22012


def test_matches_autodl_now_and_golden_file_is_current(golden):
  pytest.importorskip('torch')
  pytest.importorskip('xautodl')
  from xautodl.models.cell_searchs.genotypes import Structure
  fresh = gen.generate()
  for name in ('search', 'search_untracked', 'child'):
    _assert_agree(ours(name, fresh[name]), fresh[name], TOLERANCES, f'NB201 {name} vs xautodl')
  exact = {k: (0.0, 0.0) for k in ('params', 'flops')}
  stale = (mismatches(golden['counts'], fresh['counts'], exact)
           + [bad for name in ('search', 'search_untracked', 'child') for bad in mismatches(
               golden[name], fresh[name], {**TOLERANCES, **{k: (1e-7, 0.0) for k in INPUTS}})])
  assert not stale, (f'{os.path.relpath(gen.GOLDEN, ROOT)} is not what '
                     f'experiments/nb201_golden.py computes now; if the change is meant, rerun '
                     f'it:\n' + '\n'.join(stale[:20]))
  # The arch strings are xautodl's: its parser reads ours, its printer writes ours.
  for ops_ in itertools.islice(itertools.product(nb201.OP_NAMES, repeat=6), 0, None, 97):
    text = str(Arch(ops_))
    assert Structure.str2structure(text).tostr() == text
    assert Structure.str2structure(text).check_valid() == (Arch(ops_).disconnection() is None)


# ----------------------------------------------------------------------------
# Arch strings.


def test_arch_strings_round_trip_all_15625_cells():
  seen = set()
  for ops_ in itertools.product(nb201.OP_NAMES, repeat=6):
    arch = Arch(ops_)
    text = str(arch)
    assert Arch.from_string(text) == arch
    assert Arch.from_json(arch.to_json()) == arch
    seen.add(text)
  assert len(seen) == 5 ** 6 == 15625
  assert str(Arch.from_string(nb201.EXAMPLE)) == nb201.EXAMPLE
  assert Arch.from_string(nb201.EXAMPLE).nodes == (
      (('nor_conv_3x3', 0),), (('nor_conv_3x3', 0), ('avg_pool_3x3', 1)),
      (('skip_connect', 0), ('nor_conv_3x3', 1), ('skip_connect', 2)))
  assert Arch.from_string(nb201.EXAMPLE).to_dict() == {'arch': nb201.EXAMPLE}


GOOD = '|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|none~2|'


@pytest.mark.parametrize('text, position, phrase', [
    ('', 0, "expected '|' opening node 1, found the end"),
    ('nor_conv_3x3~0|' + GOOD[15:], 0, "expected '|' opening node 1"),
    (GOOD.replace('nor_conv_3x3~1', 'conv_3x3~1'), 25, "unknown op 'conv_3x3'"),
    (GOOD.replace('none~1', 'none~2'), 62, "expected input 1"),
    (GOOD.replace('none~0|', 'none_0|'), 18, 'expected <op>~0 for the edge 2<-0'),
    (GOOD.replace('+', '', 1), 16, "expected '+' between node 1 and node 2, found '|'"),
    (GOOD[:-1], len(GOOD) - 1, "expected '|' closing the edge 3<-2, found the end"),
    (GOOD + '+|none~0|', len(GOOD), 'expected the end after node 3'),
    ('|nor_conv_3x3~0+' + GOOD[16:], 15, "expected '|' closing the edge 1<-0, found '+'"),
])
def test_malformed_arch_string_is_a_one_line_error_naming_the_position(text, position, phrase):
  with pytest.raises(ValueError) as e:
    Arch.from_string(text)
  message = str(e.value)
  assert '\n' not in message
  assert f'at position {position}:' in message and phrase in message, message


def test_arch_rejects_bad_values():
  with pytest.raises(ValueError, match='6 edges'):
    Arch(('none',) * 5)
  with pytest.raises(ValueError, match="edge 3<-1: unknown op 'max_pool_3x3'"):
    Arch(('none',) * 4 + ('max_pool_3x3', 'none'))
  with pytest.raises(ValueError, match='must be a str'):
    Arch.from_string(None)
  with pytest.raises(ValueError, match='"arch"'):
    Arch.from_json('{"normal": []}')


# ----------------------------------------------------------------------------
# Derivation.


def test_derivation_on_hand_made_alpha():
  # Columns: none, skip, conv1x1, conv3x3, avg_pool. Rows: 1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2.
  alpha = np.array([[0.0, 1.0, 2.0, 3.0, 0.5],   # conv3x3
                    [5.0, 1.0, 0.0, 0.0, 2.0],   # none; without none: avg_pool
                    [0.0, 4.0, 4.0, 1.0, 0.0],   # a tie: the first, skip
                    [9.0, 0.0, 0.0, 0.0, 0.0],   # none; without none: a 4-way tie -> skip
                    [0.0, 0.0, 0.0, 0.0, 1.0],   # avg_pool
                    [2.0, 0.0, 1.0, 0.0, 0.0]],  # none; without none: conv1x1
                   np.float32)
  assert str(SPACE.derive({'cell': alpha}, 'snas')) == (
      '|nor_conv_3x3~0|+|none~0|skip_connect~1|+|none~0|avg_pool_3x3~1|none~2|')
  assert str(SPACE.derive({'cell': alpha}, 'darts')) == (
      '|nor_conv_3x3~0|+|avg_pool_3x3~0|skip_connect~1|+|skip_connect~0|avg_pool_3x3~1|'
      'nor_conv_1x1~2|')
  # The derived cell equals its own one-hot Z re-derived.
  arch = SPACE.derive({'cell': alpha}, 'snas')
  assert nb201.derive_snas(arch.one_hot()) == arch
  with pytest.raises(ValueError, match='unknown derivation rule'):
    SPACE.derive({'cell': alpha}, 'top2')
  with pytest.raises(ValueError, match=r"alpha\['cell'\] must be \[6, 5\]"):
    SPACE.derive({'cell': alpha[:, :4]}, 'snas')


def test_a_cell_without_a_path_from_input_to_output_is_reported():
  cut = Arch.from_string('|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|none~1|none~2|')
  assert 'no path from its input (node 0) to its output (node 3)' in cut.disconnection()
  # Node 1 is cut off, but node 3 reads node 0 through node 2: connected.
  assert Arch.from_string('|none~0|+|skip_connect~0|none~1|+|none~0|none~1|avg_pool_3x3~2|'
                          ).disconnection() is None
  # A path through a cut-off node does not count.
  assert Arch.from_string('|none~0|+|none~0|skip_connect~1|+|none~0|none~1|skip_connect~2|'
                          ).disconnection() is not None
  # The child of a cut cell does not depend on the image (AutoDL's Zero ops give zeros too).
  net = SPACE.child_network(cut, 4, 1, 10)

  def logits(images):
    variables = net.init(jax.random.key(1), images, jnp.float32(0), False)
    return net.apply(variables, images, jnp.float32(0), False)[0]

  out = _jit(logits)(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)))
  np.testing.assert_array_equal(out[0], out[1])
  assert SPACE.derive({'cell': np.eye(6, 5)[[0, 0, 0, 0, 0, 0]]}, 'snas').disconnection()


# ----------------------------------------------------------------------------
# Ops.


@pytest.mark.parametrize('h,w', [(1, 1), (1, 3), (2, 2), (5, 7)])
def test_box_sum_average_pool_and_its_gradient_equal_the_reduce_window_pool(h, w):
  """nb201.avg_pool_3x3 (shifted adds, a box-sum VJP) against flax's reduce-window pool with
  count_include_pad=False and its autodiff gradient, borders and 1-pixel sides included."""
  from flax import linen as nn
  rng = np.random.default_rng(h * 10 + w)
  x = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
  reference = lambda v: nn.avg_pool(v, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)
  np.testing.assert_allclose(nb201.avg_pool_3x3(x), reference(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vjp(nb201.avg_pool_3x3, x)[1](g)[0],
                             jax.vjp(reference, x)[1](g)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('offset', [0.0, 3.0])
def test_mix_edges_gradient_is_batch_norms_whole_gradient(offset):
  """mix_edges (statistics in without gradient) against autodiff of the same mix with the
  statistics computed inside, for every input; offset: conv outputs whose mean is 3 std."""
  rng = np.random.default_rng(1)
  g, c = 3, 4
  arrays = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  z_shared, z_wide = arrays(g, 2), arrays(g, 2)
  shared = (arrays(2, 5, 5, c), arrays(2, 5, 5, c))
  ys = (arrays(2, 5, 5, g * c) + offset, arrays(2, 5, 5, g * c) - offset)
  weights = [arrays(2, 5, 5, c) for _ in range(g)]

  def stats(y):
    mean = y.mean((0, 1, 2))
    return mean, jnp.square(y).mean((0, 1, 2)) - jnp.square(mean)

  def loss(mix, stats_of, z_shared, shared, z_wide, ys):
    wide = tuple((y, *stats_of(y)) for y in ys)
    return sum((w * out).sum() for w, out in zip(weights, mix(z_shared, shared, z_wide, wide)))

  args = (z_shared, shared, z_wide, ys)
  ours = jax.grad(functools.partial(loss, nb201.mix_edges, lambda y: stats(jax.lax.stop_gradient(y))),
                  argnums=(0, 1, 2, 3))(*args)
  autodiff = jax.grad(functools.partial(loss, nb201._mix, stats), argnums=(0, 1, 2, 3))(*args)
  wide = tuple((y, *stats(y)) for y in ys)
  np.testing.assert_allclose(nb201.mix_edges(z_shared, shared, z_wide, wide),
                             nb201._mix(z_shared, shared, z_wide, wide))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(autodiff)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()))


# ----------------------------------------------------------------------------
# Costs.


def test_op_costs():
  # C = 16, 32x32 (NB201's first stage), params / FLOPs / MAC.
  assert nb201.op_cost('none', 16, 32) == (0, 0, 0)
  assert nb201.op_cost('skip_connect', 16, 32) == (0, 0, 32_768)
  assert nb201.op_cost('nor_conv_1x1', 16, 32) == (256, 262_144, 33_024)
  assert nb201.op_cost('nor_conv_3x3', 16, 32) == (2_304, 2_359_296, 35_072)
  assert nb201.op_cost('avg_pool_3x3', 16, 32) == (0, 147_456, 32_768)
  assert [op.cost(16, 32, 1) for op in SPACE.ops.values()] == [
      nb201.op_cost(name, 16, 32) for name in nb201.OP_NAMES]
  with pytest.raises(ValueError, match='stride 1'):
    nb201.op_cost('nor_conv_3x3', 16, 32, stride=2)


@pytest.mark.parametrize('arch', [gen.COUNT_ARCHS[0], gen.COUNT_ARCHS[2], gen.COUNT_ARCHS[6]])
def test_cost_tables_add_up_to_the_networks_counts(arch):
  """For a cell without pools, the tables' FLOPs over every cell are the multiply-adds the
  cells add to an all-`none` network, and their params the parameters minus the BN ones."""
  tables = SPACE.cost_tables(gen.COUNT_C, gen.COUNT_N, gen.COUNT_IMAGE_SIZE)
  assert tables['cell'].shape == (3 * gen.COUNT_N, 6, 5, 3)
  z = Arch.from_string(arch).one_hot()
  params, flops, _ = np.einsum('ek,nekj->j', z, tables['cell'])
  empty = '|none~0|+|none~0|none~1|+|none~0|none~1|none~2|'
  (p1, m1), (p0, m0) = _counts(arch, 10), _counts(empty, 10)
  convs = sum(op.startswith('nor_conv') for op in Arch.from_string(arch).ops)
  bn_params = convs * gen.COUNT_N * 2 * (16 + 32 + 64)  # scale and offset per channel
  assert flops == m1 - m0 and params == p1 - p0 - bn_params


# ----------------------------------------------------------------------------
# The space value.


def test_space_value():
  assert spaces.get('nb201') is nb201.SPACE
  with pytest.raises(ValueError, match="unknown search space 'nas101'; choose one of darts, nb201"):
    spaces.get('nas101')
  assert SPACE.op_names == nb201.OP_NAMES and SPACE.arch_shape == (6, 5)
  assert SPACE.edges == ((0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2))
  assert SPACE.edge_batches == (((0,), (0, 1, 2), (0, 1, 3)), ((1,), (1, 2), (2, 4)),
                                ((2,), (2,), (5,)))
  assert SPACE.cell_types == ('cell',) and SPACE.cell_output == 'last'
  # The same DAG code gives the DARTS cell's edges and batches.
  assert dag_edges(2, 4) == genotypes.EDGES and dag_edge_batches(2, 4) == genotypes.edge_batches()
  assert SPACE.genotype_type is Arch
  with pytest.raises(ValueError, match=r"z must map the cell types \['cell'\]"):
    SPACE.check_arch_weights({'normal': np.zeros((6, 5)), 'reduce': np.zeros((6, 5))})
  net = SPACE.search_network(4, 1, 10)
  with pytest.raises(ValueError, match=r"z\['cell'\] must be \[6, 5\]"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                    {'cell': jnp.zeros((14, 8))}, True))


def test_draw_writes_one_png_per_cell_type(tmp_path):
  arch = Arch.from_string(nb201.EXAMPLE)
  paths = SPACE.draw(arch, str(tmp_path), 'snas')
  assert paths == [str(tmp_path / 'cell_snas.png')]
  with open(paths[0], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.listdir(tmp_path) == ['cell_snas.png']
