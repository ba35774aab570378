"""NAS-Bench-201 (Dong & Yang, ICLR 2020), as AutoDL-Projects defines it.

Followed: xautodl 1.0.0 (D-X-Y/AutoDL-Projects): ``models/cell_operations.py``
(the ops), ``models/cell_infers/tiny_network.py`` and ``cells.py``
(TinyNetwork, InferCell: the child), ``models/cell_searchs/search_model_darts.py``
and ``search_cells.py`` (TinyNetworkDarts, NAS201SearchCell: the supernet),
``models/cell_searchs/genotypes.py`` (Structure: the arch strings). Written
here from those definitions; tests/test_nb201.py checks it against them.

**The cell.** One input (node 0), intermediate nodes 1, 2, 3; node i is the
sum of one edge from every earlier node; the cell's output is node 3. The
6 edges, in the row order of α and Z (AutoDL's sorted ``'i<-j'`` keys):
1←0, 2←0, 2←1, 3←0, 3←1, 3←2. Every edge keeps the channel count and the
resolution. The 5 ops, in column order:

| op           | module                                                      |
|--------------|-------------------------------------------------------------|
| none         | the zero op: not computed, it contributes Z·0                |
| skip_connect | identity                                                     |
| nor_conv_1x1 | ReLU -> 1x1 conv -> BN                                       |
| nor_conv_3x3 | ReLU -> 3x3 conv (pad 1) -> BN                               |
| avg_pool_3x3 | 3x3 average, pad 1 excluded from the count, stride 1; no BN   |

A conv has a bias exactly when its BN is not affine (``bias=not affine``
in AutoDL): the supernet's cell convs have one (non-affine BN), the
child's do not.

**The network** (C channels, N cells per stage): stem 3x3 conv 3→C + BN;
N cells at C; a residual basic block (stride 2) to 2C; N cells at 2C; a
block to 4C; N cells at 4C; BN + ReLU; global average pooling; linear.
The block: ReLU-conv3x3/2-BN, ReLU-conv3x3-BN, plus a shortcut 2x2 average
pool /2 -> 1x1 conv (no BN). The stem, the blocks and the head keep affine
BN in the supernet too. Every BatchNorm is ``layers.BatchNorm`` (PyTorch's:
momentum 0.1, running variance from the unbiased batch variance), that is
``track_running_stats=True``, except the supernet's cell BNs, which may run
with ``track_running_stats=False`` (``SearchNetwork``, ``SupernetReLUConvBN``).

**The supernet** (TinyNetworkDarts with Z given): every cell edge is
Σ_k Z[e, k]·op_k(x), one Z [6, 5] for all cells (cell type 'cell').
NB201's search protocol: C = 16, N = 5.

**Arch strings**, NB201's format, the 6 edges node by node:
``|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|``.
Every edge is listed (``none`` too), inputs in order: the form of the
benchmark's 15,625 cells.

**Derivation.** 'snas': per edge the argmax over all 5 ops, ``none``
included (AutoDL's ``genotype()`` of every NB201 search model does the
same). 'darts': per edge the argmax over the 4 ops other than ``none``, the
DARTS paper's rule with every edge kept (an NB201 node keeps all its
inputs). A derived cell may have no path from its input to node 3;
``Arch.disconnection`` says so.

**Costs** (docs/algorithm.md §4's conventions; y the side, C the channels,
BN parameters not counted): none 0, 0, 0; skip 0, 0, 2·y²·C; nor_conv K
size = K²·C², FLOPs size·y², MAC 2·y²·C + size; avg pool 0, 9·y²·C, 2·y²·C.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from snas_jax import layers
from snas_jax.spaces.base import Op, SearchSpace, dag_edge_batches, dag_edges

OP_NAMES = ('none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')
# What the NB201 study's collapse analysis counts (studies/nb201.py): the
# identity, and the convolutions (the ops with parameters).
SKIP_OP = 'skip_connect'
CONV_KERNELS = {'nor_conv_1x1': 1, 'nor_conv_3x3': 3}  # the ReLU-conv-BN ops: kernel size
CONV_OPS = tuple(CONV_KERNELS)
NUM_INPUT_STATES = 1
NUM_NODES = 3  # intermediate nodes 1, 2, 3 (node 0 is the cell's input)
EDGES = dag_edges(NUM_INPUT_STATES, NUM_NODES)  # (intermediate node, state): node i+1 <- state
EDGE_BATCHES = dag_edge_batches(NUM_INPUT_STATES, NUM_NODES)
CELL_TYPE = 'cell'  # the one cell type: α and Z are {'cell': [6, 5]}
SEARCH_C, SEARCH_N = 16, 5  # NB201's search protocol
EXAMPLE = '|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|'


# ----------------------------------------------------------------------------
# Ops.


class ReLUConvBN(nn.Module):
  """ReLU -> KxK conv (pad K//2, bias iff BN is not affine) -> BN.

  x [N,H,W,C_in] -> [N,H',W',c_out]. The supernet's cell edges run
  ``SupernetReLUConvBN`` instead (with or without running statistics).
  """
  c_out: int
  kernel: int
  stride: int = 1
  affine: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    k, pad = self.kernel, self.kernel // 2
    fan_in = x.shape[-1] * k * k
    y = nn.Conv(self.c_out, (k, k), (self.stride, self.stride), padding=((pad, pad), (pad, pad)),
                use_bias=not self.affine, kernel_init=layers.torch_weight_init,
                bias_init=layers.torch_bias_init(fan_in), name='conv')(nn.relu(x))
    return layers.BatchNorm(self.affine, name='bn')(y, train)


def _box_sum_3x3(x):
  """The 3x3 sum around every pixel of x [N,H,W,C], zero beyond the border: a row of 3 then a
  column of 3 shifted adds (faster on XLA:CPU than its reduce-window)."""
  h, w = x.shape[1:3]
  rows = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
  rows = rows[:, :, :w] + rows[:, :, 1:w + 1] + rows[:, :, 2:]
  cols = jnp.pad(rows, ((0, 0), (1, 1), (0, 0), (0, 0)))
  return cols[:, :h] + cols[:, 1:h + 1] + cols[:, 2:]


def _window_counts(h: int, w: int) -> np.ndarray:
  """How many in-bounds pixels each 3x3 window (pad 1, stride 1) holds: [H, W, 1]."""
  def per_axis(n):  # i-1, i, i+1 in [0, n)
    i = np.arange(n)
    return 1 + (i > 0) + (i < n - 1)
  return (per_axis(h)[:, None] * per_axis(w)[None, :])[..., None].astype(np.float32)


@jax.custom_vjp
def avg_pool_3x3(x):
  """3x3 average pool, stride 1, pad 1 excluded from the count. Custom VJP: the pool is
  linear and its transpose is the same box sum of the cotangent over the counts (autodiff
  would pad it once per shifted slice)."""
  return _box_sum_3x3(x) / _window_counts(*x.shape[1:3])


def _avg_pool_fwd(x):
  return avg_pool_3x3(x), None


def _avg_pool_bwd(_, g):
  return (_box_sum_3x3(g / _window_counts(*g.shape[1:3])),)


avg_pool_3x3.defvjp(_avg_pool_fwd, _avg_pool_bwd)


class AvgPool(nn.Module):
  """3x3 average pool, stride 1, pad 1 excluded from the count (PyTorch's
  count_include_pad=False); no BN."""

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return avg_pool_3x3(x)


def _check_stride(stride: int) -> None:
  if stride != 1:
    raise ValueError(f'NB201 cell edges keep the resolution (stride 1), got stride {stride}')


# Op factories: (c, stride, *, affine, name) -> module or None.


def _none(c, stride, *, affine=True, name=None):
  del c, affine, name
  _check_stride(stride)
  return None


def _skip(c, stride, *, affine=True, name=None):
  del c, affine
  _check_stride(stride)
  return layers.Identity(name=name)


def _relu_conv_bn(kernel: int):
  def make(c, stride, *, affine=True, name=None):
    _check_stride(stride)
    return ReLUConvBN(c, kernel, stride, affine, name=name)
  return make


def _avg_pool(c, stride, *, affine=True, name=None):
  del c, affine
  _check_stride(stride)
  return AvgPool(name=name)


def op_cost(name: str, c: int, y: int, stride: int = 1) -> tuple:
  """(params, FLOPs, MAC) of op ``name`` with C channels and output side y (module docstring)."""
  _check_stride(stride)
  area = y * y
  if name == 'none':
    return 0, 0, 0
  if name == 'skip_connect':
    return 0, 0, 2 * area * c
  if name in CONV_KERNELS:
    size = CONV_KERNELS[name] ** 2 * c * c
    return size, size * area, 2 * area * c + size
  if name == 'avg_pool_3x3':
    return 0, 9 * area * c, 2 * area * c
  raise ValueError(f'unknown NB201 op {name!r}; choose one of {", ".join(OP_NAMES)}')


def _cost(name: str):
  return lambda c, y, stride=1: op_cost(name, c, y, stride)


OPS = {
    'none': Op(_none, _cost('none')),
    'skip_connect': Op(_skip, _cost('skip_connect')),
    'nor_conv_1x1': Op(_relu_conv_bn(CONV_KERNELS['nor_conv_1x1']), _cost('nor_conv_1x1')),
    'nor_conv_3x3': Op(_relu_conv_bn(CONV_KERNELS['nor_conv_3x3']), _cost('nor_conv_3x3')),
    'avg_pool_3x3': Op(_avg_pool, _cost('avg_pool_3x3')),
}
assert tuple(OPS) == OP_NAMES


def stage_layout(c: int, n: int) -> tuple:
  """(channels, is the residual block) of every position of the cell stack: N cells at C,
  a block to 2C, N cells at 2C, a block to 4C, N cells at 4C (3N + 2 positions)."""
  layout = []
  for stage in range(3):
    if stage:
      layout.append((c << stage, True))
    layout += [(c << stage, False)] * n
  return tuple(layout)


def network_cost_tables(c: int, layers: int, image_size: int) -> dict:
  """{'cell': [3N, 6, 5, 3]}: (params, FLOPs, MAC) of every op on every edge of every cell."""
  cells, y = [], image_size
  for channels, block in stage_layout(c, layers):
    if block:
      y //= 2
      continue
    table = np.array([[op_cost(name, channels, y) for name in OP_NAMES] for _ in EDGES],
                     np.float64)
    cells.append(table)
  return {CELL_TYPE: np.stack(cells)}


# ----------------------------------------------------------------------------
# Networks.


class ResNetBasicBlock(nn.Module):
  """The block between stages: ReLU-conv3x3/2-BN -> ReLU-conv3x3-BN, plus the shortcut
  2x2 average pool /2 -> 1x1 conv (no BN). x [N,H,W,C_in] -> [N,H/2,W/2,c_out]."""
  c_out: int

  @nn.compact
  def __call__(self, x, train: bool):
    y = ReLUConvBN(self.c_out, 3, 2, name='conv_a')(x, train)
    y = ReLUConvBN(self.c_out, 3, 1, name='conv_b')(y, train)
    shortcut = nn.avg_pool(x, (2, 2), (2, 2), 'VALID')
    return layers.conv(self.c_out, 1, name='downsample')(shortcut) + y


def _edges_to_wide(tree):
  """An edge batch's variables as one wide ReLUConvBN's: kernels [G,K,K,C,C] -> [K,K,C,G·C]
  (edge g's output channels the g-th block), biases and BN statistics [G,C] -> [G·C]."""
  def wide(v):
    if v.ndim == 5:
      g, k, _, c_in, c_out = v.shape
      return v.transpose(1, 2, 3, 0, 4).reshape(k, k, c_in, g * c_out)
    return v.reshape(-1)
  return jax.tree.map(wide, tree)


def _wide_to_edges(g: int, tree):
  """The inverse of ``_edges_to_wide`` for G edges."""
  def per_edge(v):
    if v.ndim == 4:
      k, _, c_in, gc = v.shape
      return v.reshape(k, k, c_in, g, gc // g).transpose(3, 0, 1, 2, 4)
    return v.reshape(g, -1)
  return jax.tree.map(per_edge, tree)


class _ConvVariables(nn.Module):
  """``nn.Conv``'s variables with a bias (kernel [K,K,C_in,C_out], bias [C_out], its
  initialisers), declared without applying them: (kernel, bias)."""
  shape: tuple

  @nn.compact
  def __call__(self):
    k, _, c_in, c_out = self.shape
    return (self.param('kernel', layers.torch_weight_init, self.shape),
            self.param('bias', layers.torch_bias_init(k * k * c_in), (c_out,)))


class _RunningStats(nn.Module):
  """``layers.BatchNorm``'s variables without affine parameters: (mean, var) [C] variables."""
  c: int

  @nn.compact
  def __call__(self):
    return (self.variable('batch_stats', 'mean', jnp.zeros, (self.c,), jnp.float32),
            self.variable('batch_stats', 'var', jnp.ones, (self.c,), jnp.float32))


class SupernetReLUConvBN(nn.Module):
  """AutoDL's ``ReLUConvBN(affine=False, track_running_stats)`` of the supernet's
  edges, on x already through the ReLU, in two halves: this module's conv and BN
  statistics, and the normalisation, which ``mix_edges`` does as it mixes the
  edges. Returns (y, mean, var): y the conv's output *without its bias*, and the
  mean and variance that normalise it, ŷ = (y − mean)/√(var + ε).

  In training (and with ``track_running_stats=False`` always), BN subtracts the
  batch mean, so the conv's bias cancels: it is not added (its gradient is
  exactly 0, as the reference's up to rounding) and the running mean takes it
  instead. The batch variance comes from the same pass as the mean:
  E[y²] − E[y]². Batch statistics leave through ``stop_gradient``: their
  dependence on y is in ``mix_edges``'s gradient. In evaluation with running
  statistics they are (running mean − bias, running var), constants.
  """
  c_out: int
  kernel: int
  track_running_stats: bool = True

  @nn.compact
  def __call__(self, relu_x, train: bool):
    k, pad = self.kernel, self.kernel // 2
    kernel, bias = _ConvVariables((k, k, relu_x.shape[-1], self.c_out), name='conv')()
    y = jax.lax.conv_general_dilated(relu_x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    running = (_RunningStats(self.c_out, name='bn')() if self.track_running_stats else None)
    if running is not None and not train:
      return y, running[0].value - bias, running[1].value
    axes = tuple(range(y.ndim - 1))
    y_const = jax.lax.stop_gradient(y)
    mean = y_const.mean(axes)
    var = jnp.maximum(jnp.square(y_const).mean(axes) - jnp.square(mean), 0.0)
    if running is not None and not self.is_initializing():
      n, m = y.size // self.c_out, layers.BN_MOMENTUM
      running[0].value = (1 - m) * running[0].value + m * (mean + bias)
      running[1].value = (1 - m) * running[1].value + m * var * (n / max(n - 1, 1))
    return y, mean, var


def _mix(z_shared, shared, z_wide, wide):
  """Edge g's output Σ_s z_shared[g,s]·shared[s] + Σ_w z_wide[g,w]·ŷ_w[g], where
  shared[s] [N,H,W,C] is an op's output for every edge, wide[w] = (y, mean, var) an
  op's G edges' outputs side by side (y [N,H,W,G·C]) with the statistics that
  normalise them, ŷ_w[g] the g-th block of C channels of (y − mean)/√(var + ε)."""
  g = z_shared.shape[0]
  c = shared[0].shape[-1]
  normalised = [(y - mean) * jax.lax.rsqrt(var + layers.BN_EPSILON) for y, mean, var in wide]
  outputs = []
  for edge in range(g):
    out = 0.0
    for s, x in enumerate(shared):
      out = out + z_shared[edge, s] * x
    for w, y in enumerate(normalised):
      out = out + z_wide[edge, w] * y[..., edge * c:(edge + 1) * c]
    outputs.append(out)
  return tuple(outputs)


@jax.custom_vjp
def mix_edges(z_shared, shared, z_wide, wide):
  """``_mix`` with the wide ops normalised by their batch statistics, which must be
  y's own (mean and var over every axis but the last) and carry no gradient:
  the gradient here is BN's whole one (through the statistics too).

  Why by hand: autodiff's gradient keeps every normalised output and takes each
  edge's and op's z-gradient in a pass over memory of its own (G·ops passes), BN's
  sums in more. The z-gradients and BN's sums are the same per-channel sums of the
  cotangents, taken here once in the wide layout (Σ d; Σ d·y per wide op; Σ d·x per
  shared op), and each wide op's input gradient is one elementwise pass in the
  layout its convolution's gradient reads. Σ d·(y − mean) is Σ d·y − mean·Σ d, so
  y − mean is never stored (as the forward pass's variance is E[y²] − E[y]²).
  """
  return _mix(z_shared, shared, z_wide, wide)


def _mix_edges_fwd(z_shared, shared, z_wide, wide):
  return _mix(z_shared, shared, z_wide, wide), (z_shared, shared, z_wide, wide)


def _mix_edges_bwd(residuals, douts):
  z_shared, shared, z_wide, wide = residuals
  g = z_shared.shape[0]
  d = jnp.concatenate(douts, axis=-1)  # [N,H,W,G·C], edge g's cotangent the g-th block
  axes = tuple(range(d.ndim - 1))
  n = d.size // d.shape[-1]
  # Per channel of the wide layout: Σ d, Σ d·y for each wide op, Σ d·x for each shared x.
  tile = lambda x: jnp.tile(x, (1,) * (x.ndim - 1) + (g,))
  sum_d = d.sum(axes)
  sum_dy = [(d * y).sum(axes) for y, _, _ in wide]
  sum_dx = jnp.stack([(d * tile(x)).sum(axes) for x in shared])
  dz_shared = sum_dx.reshape(len(shared), g, -1).sum(-1).T
  dshared = tuple(sum(z_shared[edge, s] * douts[edge] for edge in range(g))
                  for s in range(len(shared)))
  dz_wide, dwide = [], []
  for w, (y, mean, var) in enumerate(wide):
    rstd = jax.lax.rsqrt(var + layers.BN_EPSILON)
    sum_dc = sum_dy[w] - mean * sum_d  # Σ d·(y − mean) per channel
    dz_wide.append((rstd * sum_dc).reshape(g, -1).sum(1))  # Σ d·ŷ over each edge's block
    scale = jnp.repeat(z_wide[:, w], d.shape[-1] // g) * rstd
    dy = scale * (d - sum_d / n - (y - mean) * (jnp.square(rstd) * sum_dc / n))
    dwide.append((dy, jnp.zeros_like(mean), jnp.zeros_like(var)))
  return dz_shared, dshared, jnp.stack(dz_wide, -1), tuple(dwide)


mix_edges.defvjp(_mix_edges_fwd, _mix_edges_bwd)


class EdgeBatch(nn.Module):
  """The G supernet edges leaving one state, each AutoDL's MixedOp Σ_k z[g, k]·op_k(x) with
  BN not affine. x [N,H,W,C], z [G, 5] -> [edge g's output [N,H,W,C] for g < G].

  Every edge reads the same x, so each op runs once for the batch: an op
  without parameters (skip, avg pool) is the same for every edge, and the G
  edges' ReLU-conv-BN of one op are one ReLU-conv-BN with G·C output channels,
  edge g's the g-th block of C (a BN normalises each channel alone, so one BN
  over G·C channels is the G edges' BNs). The variables keep the per-edge
  layout with a leading G axis (``nor_conv_3x3/conv/kernel`` [G,3,3,C,C],
  ``nor_conv_3x3/bn/mean`` [G,C]) and are mapped to the wide one inside the
  step. One wide convolution per op rather than G small ones, and not a vmap:
  that makes a grouped convolution, which XLA:CPU runs slowly (docs/performance.md).
  ``mix_edges`` normalises the wide outputs and weighs the ops by z, in training
  with BN's gradient written out.
  """
  c: int
  train: bool
  track_running_stats: bool = True

  @nn.compact
  def __call__(self, x, z):
    g = z.shape[0]
    # init: the wide module creates its variables, stored per edge; apply: it reads them
    # through the mapping (and writes its BN statistics back through the inverse).
    wide_op = nn.map_variables(SupernetReLUConvBN, ('params', 'batch_stats'), _edges_to_wide,
                               functools.partial(_wide_to_edges, g),
                               init=self.is_initializing(), mutable=True)
    relu_x = nn.relu(x)  # shared by the convs
    shared, z_shared, wide, z_wide = [], [], [], []
    for k, name in enumerate(OP_NAMES):
      if name in CONV_KERNELS:
        op = wide_op(g * self.c, CONV_KERNELS[name], self.track_running_stats, name=name)
        wide.append(op(relu_x, self.train))
        z_wide.append(z[:, k])
        continue
      op = OPS[name].module(self.c, 1, affine=False, name=name)
      if op is not None:  # 'none' adds z·0
        shared.append(op(x, self.train))
        z_shared.append(z[:, k])
    args = (jnp.stack(z_shared, -1), tuple(shared), jnp.stack(z_wide, -1), tuple(wide))
    batch_statistics = self.train or not self.track_running_stats
    return list(mix_edges(*args) if batch_statistics else _mix(*args))


class SearchCell(nn.Module):
  """NAS201SearchCell given Z: x [N,H,W,C], z [6, 5] -> node 3 [N,H,W,C].

  The edges leaving the same node run as one ``EdgeBatch`` (names
  ``edges_from_0``, ``_1``, ``_2``): 3 batches instead of 6 edges.
  """
  c: int
  train: bool
  track_running_stats: bool = True

  @nn.compact
  def __call__(self, x, z):
    states = [x]
    nodes = [0.0] * NUM_NODES
    for b, (sources, dests, rows) in enumerate(EDGE_BATCHES):
      (source,) = sources  # one input state: every batch leaves one state
      outputs = EdgeBatch(self.c, self.train, self.track_running_stats,
                          name=layers.edge_batch_name(sources))(states[source], z[jnp.array(rows)])
      for d, y in zip(dests, outputs):  # edge g feeds intermediate node dests[g]
        nodes[d] = nodes[d] + y
      states.append(nodes[b])  # intermediate node b has all its inputs after batch b
    return nodes[-1]


def _stem(c: int, images, train: bool):
  return layers.BatchNorm(name='stem_bn')(layers.conv(c, 3, name='stem_conv')(images), train)


def _head(num_classes: int, x, train: bool):
  x = nn.relu(layers.BatchNorm(name='lastact_bn')(x, train))
  x = jnp.mean(x, axis=(1, 2))
  return layers.dense(num_classes, x.shape[-1], name='classifier')(x)


class SearchNetwork(nn.Module):
  """The NB201 supernet: ``(images [N,H,W,3], z {'cell': [6, 5]}, train)`` -> logits [N, classes].

  ``n``: cells per stage. Variables: ``stem_*``, ``cell_<i>`` for the 3N + 2
  positions of the stack (cells and blocks, numbered as AutoDL's
  ``cells``), ``lastact_bn``, ``classifier``. ``track_running_stats``: of
  the cells' BNs (AutoDL's ``--track_running_stats``; its NB201 search
  scripts take it as an argument, their example runs 0): False normalises
  them with the batch's statistics in evaluation too, and they keep none.
  """
  c: int = SEARCH_C
  n: int = SEARCH_N
  num_classes: int = 10
  track_running_stats: bool = True

  @nn.compact
  def __call__(self, images, z, train: bool):
    SPACE.check_arch_weights(z)
    x = _stem(self.c, images, train)
    for i, (channels, block) in enumerate(stage_layout(self.c, self.n)):
      if block:
        x = ResNetBasicBlock(channels, name=f'cell_{i}')(x, train)
      else:
        x = SearchCell(channels, train, self.track_running_stats, name=f'cell_{i}')(
            x, jnp.asarray(z[CELL_TYPE]))
    return _head(self.num_classes, x, train)


class ChildCell(nn.Module):
  """InferCell: the derived cell's edges, affine BN. x [N,H,W,C] -> node 3 [N,H,W,C].

  Edge i←j is named ``edge_<i>_<j>``; a ``none`` edge is not computed, and a
  node whose edges are all ``none`` is zeros (AutoDL sums zero tensors).
  """
  arch: 'Arch'
  c: int

  @nn.compact
  def __call__(self, x, train: bool):
    states = [x]
    for node, edges in enumerate(self.arch.nodes):
      total = None
      for name, state in edges:
        op = OPS[name].module(self.c, 1, affine=True, name=f'edge_{node + 1}_{state}')
        if op is None:
          continue
        y = op(states[state], train)
        total = y if total is None else total + y
      states.append(jnp.zeros_like(x) if total is None else total)
    return states[-1]


class ChildNetwork(nn.Module):
  """TinyNetwork with a derived cell: ``(images [N,H,W,3], drop_rate, train)`` -> (logits, None).

  The call matches the DARTS space's child networks (``child_model``), so one
  training loop runs both; NB201's protocol has no drop-path and no
  auxiliary head: ``drop_rate`` is not used and the second output is None.
  """
  arch: 'Arch'
  c: int = SEARCH_C
  n: int = SEARCH_N
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, drop_rate, train: bool):
    del drop_rate
    x = _stem(self.c, images, train)
    for i, (channels, block) in enumerate(stage_layout(self.c, self.n)):
      if block:
        x = ResNetBasicBlock(channels, name=f'cell_{i}')(x, train)
      else:
        x = ChildCell(self.arch, channels, name=f'cell_{i}')(x, train)
    return _head(self.num_classes, x, train), None


def build_search_network(c: int, layers: int, num_classes: int,
                         track_running_stats: bool = True, *, drop_path: float = 0.0,
                         remat: bool = False, dtype=jnp.float32) -> SearchNetwork:
  """The supernet with C channels and ``layers`` = N cells per stage. It has
  no drop-path, no recomputation and computes in float32: a one-line
  ValueError for the search's flags asking otherwise."""
  if drop_path:
    raise ValueError(f'--drop_path={drop_path}: the NB201 supernet has no drop-path; use '
                     f'--drop_path=0 with --space=nb201')
  if remat:
    raise ValueError('--remat: the NB201 supernet does not recompute its cells; drop --remat '
                     'with --space=nb201')
  if jnp.dtype(dtype) != jnp.float32:
    raise ValueError(f'--dtype={jnp.dtype(dtype).name}: the NB201 supernet computes in float32; '
                     f'use --dtype=float32 with --space=nb201')
  return SearchNetwork(c=c, n=layers, num_classes=num_classes,
                       track_running_stats=track_running_stats)


def check_network(layers: int, image_size: int) -> None:
  """Two residual blocks halve the image: its side must be a multiple of 4."""
  del layers
  if image_size % 4:
    raise ValueError(f'--image_size={image_size}: the two stride-2 residual blocks of NB201\'s '
                     f'network halve it twice; use a multiple of 4 that divides 32 (8, 16, 32)')


def build_child_network(arch: 'Arch', c: int, layers: int, num_classes: int, *,
                        auxiliary: bool = False, remat: bool = False,
                        dtype=jnp.float32) -> ChildNetwork:
  """TinyNetwork with ``arch`` in every cell, C channels, ``layers`` = N cells
  per stage. It has no auxiliary head, no recomputation and computes in
  float32: a one-line ValueError for retraining flags asking otherwise."""
  if auxiliary:
    raise ValueError('the NB201 child has no auxiliary head; use --auxiliary_weight=0 with '
                     '--space=nb201')
  if remat:
    raise ValueError('--remat: the NB201 child does not recompute its cells; drop --remat with '
                     '--space=nb201')
  if jnp.dtype(dtype) != jnp.float32:
    raise ValueError(f'--dtype={jnp.dtype(dtype).name}: the NB201 child computes in float32; '
                     f'use --dtype=float32 with --space=nb201')
  return ChildNetwork(arch=arch, c=c, n=layers, num_classes=num_classes)


# ----------------------------------------------------------------------------
# Arch strings and derivation.


def _malformed(text: str, pos: int, what: str) -> ValueError:
  return ValueError(f'malformed NB201 arch string {text!r} at position {pos}: {what}; write the '
                    f'6 edges node by node, e.g. {EXAMPLE}')


def parse_arch_string(text) -> tuple:
  """The 6 op names, in row order, of an arch string (one-line ValueError naming the position)."""
  if not isinstance(text, str):
    raise ValueError(f'an NB201 arch string must be a str, got {type(text).__name__}')

  def expect(pos: int, char: str, why: str) -> int:
    if pos >= len(text) or text[pos] != char:
      found = repr(text[pos]) if pos < len(text) else 'the end'
      raise _malformed(text, pos, f'expected {char!r} {why}, found {found}')
    return pos + 1

  ops_in_rows, pos = [], 0
  for node in range(1, NUM_NODES + 1):
    if node > 1:
      pos = expect(pos, '+', f'between node {node - 1} and node {node}')
    pos = expect(pos, '|', f'opening node {node}')
    for state in range(node):
      ends = [i for i in (text.find('|', pos), text.find('+', pos)) if i >= 0]
      end = min(ends) if ends else len(text)
      token = text[pos:end]
      op, tilde, index = token.rpartition('~')
      if not tilde:
        raise _malformed(text, pos, f'expected <op>~{state} for the edge {node}<-{state}, '
                                    f'found {token!r}')
      if op not in OP_NAMES:
        raise _malformed(text, pos, f'unknown op {op!r}; the ops are {", ".join(OP_NAMES)}')
      if index != str(state):
        raise _malformed(text, pos + len(op) + 1,
                         f'expected input {state} (node {node} lists its inputs '
                         f'0..{node - 1} in order), found {index!r}')
      ops_in_rows.append(op)
      pos = expect(end, '|', f'closing the edge {node}<-{state}')
  if pos != len(text):
    raise _malformed(text, pos, f'expected the end after node {NUM_NODES}, found {text[pos]!r}')
  return tuple(ops_in_rows)


@dataclasses.dataclass(frozen=True)
class Arch:
  """An NB201 cell: the op of each of the 6 edges, in row order
  (1←0, 2←0, 2←1, 3←0, 3←1, 3←2).

  ``str(arch)`` is the arch string, ``Arch.from_string`` parses one; the
  JSON form is ``{"arch": "<arch string>"}``.
  """
  ops: tuple

  def __post_init__(self):
    ops_ = tuple(self.ops) if isinstance(self.ops, (list, tuple)) else None
    if ops_ is None or len(ops_) != len(EDGES):
      raise ValueError(f'an NB201 cell has {len(EDGES)} edges (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, '
                       f'3<-2): give one op per edge, got {self.ops!r}')
    for row, op in enumerate(ops_):
      if op not in OP_NAMES:
        node, state = EDGES[row]
        raise ValueError(f'NB201 edge {node + 1}<-{state}: unknown op {op!r}; choose one of '
                         f'{", ".join(OP_NAMES)}')
    object.__setattr__(self, 'ops', tuple(str(op) for op in ops_))

  @classmethod
  def from_string(cls, text: str) -> 'Arch':
    return cls(parse_arch_string(text))

  def __str__(self) -> str:
    return '+'.join('|' + ''.join(f'{op}~{state}|' for op, state in edges)
                    for edges in self.nodes)

  @property
  def nodes(self) -> tuple:
    """Per intermediate node 1, 2, 3: ((op, input node), ...), inputs in order."""
    out = [[] for _ in range(NUM_NODES)]
    for (node, state), op in zip(EDGES, self.ops):
      out[node].append((op, state))
    return tuple(tuple(edges) for edges in out)

  def one_hot(self) -> np.ndarray:
    """The cell as a one-hot Z [6, 5]."""
    z = np.zeros((len(EDGES), len(OP_NAMES)), np.float32)
    z[np.arange(len(EDGES)), [OP_NAMES.index(op) for op in self.ops]] = 1.0
    return z

  def disconnection(self) -> str | None:
    """None if a path of non-``none`` edges leads from the input to node 3; else, in a line,
    that none does and what follows."""
    reached = {0}
    for node, edges in enumerate(self.nodes, start=1):
      if any(op != 'none' and state in reached for op, state in edges):
        reached.add(node)
    if NUM_NODES in reached:
      return None
    return (f'the cell {self} has no path from its input (node 0) to its output (node 3): every '
            f'path crosses a none edge, so each cell outputs zeros and the network\'s prediction '
            f'does not depend on the image')

  def to_dict(self) -> dict:
    return {'arch': str(self)}

  @classmethod
  def from_dict(cls, d: dict) -> 'Arch':
    if not isinstance(d, dict) or 'arch' not in d:
      raise ValueError(f'an NB201 genotype in JSON is {{"arch": "<arch string>"}}, got {d!r}')
    return cls.from_string(d['arch'])

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_json(cls, text: str) -> 'Arch':
    return cls.from_dict(json.loads(text))


def _check_alpha(alpha) -> np.ndarray:
  alpha = np.asarray(alpha)
  if alpha.shape != (len(EDGES), len(OP_NAMES)):
    raise ValueError(f'NB201 alpha must be [{len(EDGES)}, {len(OP_NAMES)}], '
                     f'got {list(alpha.shape)}')
  return alpha


def derive_snas(alpha) -> Arch:
  """Per edge the argmax over all 5 ops of α [6, 5], ``none`` included (ties: the first op)."""
  alpha = _check_alpha(alpha)
  return Arch(tuple(OP_NAMES[int(k)] for k in np.argmax(alpha, axis=-1)))


def derive_darts(alpha) -> Arch:
  """Per edge the argmax over the 4 ops other than ``none`` of α [6, 5] (ties: the first op)."""
  alpha = _check_alpha(alpha)
  return Arch(tuple(OP_NAMES[1 + int(k)] for k in np.argmax(alpha[:, 1:], axis=-1)))


DERIVE_RULES = {'snas': lambda alpha: derive_snas(alpha[CELL_TYPE]),
                'darts': lambda alpha: derive_darts(alpha[CELL_TYPE])}


# ----------------------------------------------------------------------------
# Drawing.


def draw_arch(arch: Arch, path: str, title: str = '') -> str:
  """Draws the cell to a PNG at ``path``: nodes 0 (input) .. 3 (output) on a line, edges from
  the input below it, the others above; ``none`` edges are not drawn, a node no edge feeds is
  dashed, and a cell with no path from input to output says so. Returns ``path``."""
  from matplotlib.patches import Circle, FancyArrowPatch
  from matplotlib.path import Path
  from snas_jax import reporting

  radius, step, rise = reporting.NODE_RADIUS, reporting.X_STEP, reporting.ARC_HEIGHT
  edges = [(op, state, node + 1) for (node, state), op in zip(EDGES, arch.ops) if op != 'none']
  fed = {node for _, _, node in edges}
  y_lim = (-(rise * NUM_NODES + 0.6), rise * (NUM_NODES - 1) + 0.6 + (0.7 if title else 0))
  fig, ax = reporting.cell_canvas(8.0, (-0.8, step * NUM_NODES + 0.8), y_lim, title,
                                  step * NUM_NODES / 2, 9)
  for state in range(NUM_NODES + 1):
    face = ('#c1ffc1' if state == 0 else '#eee8aa' if state == NUM_NODES else '#add8e6')
    dashed = state > 0 and state not in fed
    ax.add_patch(Circle((step * state, 0.0), radius, facecolor='#eeeeee' if dashed else face,
                        edgecolor='black', linewidth=1.5, linestyle='--' if dashed else '-',
                        zorder=3))
    ax.text(step * state, 0.0, str(state), ha='center', va='center', fontsize=12, zorder=4)
  for op, state, node in edges:
    height = (-1.0 if state == 0 else 1.0) * rise * (node - state)
    start, ctrl, end = reporting.arc(step * state, step * node, height)
    curve = Path([start, ctrl, end], [Path.MOVETO, Path.CURVE3, Path.CURVE3])
    ax.add_patch(FancyArrowPatch(path=curve, arrowstyle='-|>', mutation_scale=14, color='0.1',
                                 linewidth=1.4, zorder=2))
    lx, ly = reporting.bezier(start, ctrl, end, 0.5)
    ax.text(lx, ly, op, ha='center', va='center', fontsize=8.5, zorder=5,
            bbox=dict(boxstyle='round,pad=0.15', facecolor='white', edgecolor='none', alpha=0.9))
  note = 'node 0: the cell input; node 3: its output'
  if arch.disconnection():
    note += ';  NO PATH from input to output: the cell outputs zeros'
  ax.text(-0.6, y_lim[0] + 0.15, note, ha='left', va='bottom', fontsize=8, color='0.3')
  return reporting.save_figure(fig, path)


def draw(arch: Arch, folder: str, tag: str) -> list:
  """The space's drawing: ``<folder>/cell_<tag>.png``, titled with the arch string."""
  return [draw_arch(arch, os.path.join(folder, f'{CELL_TYPE}_{tag}.png'), title=str(arch))]


SPACE = SearchSpace(
    name='nb201',
    ops=OPS,
    zero_op='none',
    num_input_states=NUM_INPUT_STATES,
    num_nodes=NUM_NODES,
    cell_output='last',
    cell_types=(CELL_TYPE,),
    genotype_type=Arch,
    search_network=build_search_network,
    child_network=build_child_network,
    derive_rules=DERIVE_RULES,
    cost_tables=network_cost_tables,
    draw=draw,
    one_hot=lambda arch: {CELL_TYPE: arch.one_hot()},
    check_network=check_network,
    genotype_from_flag=Arch.from_string,
)
