"""The child networks retrained from a genotype: NetworkCIFAR, NetworkImageNet.

A child cell computes only its genotype's edges, each with the op module of
``ops.make_op`` (affine BN, one edge: S = fan_out = 1) — the very op the search
cell mixes, so search and evaluation share one implementation. Structure
follows the SNAS/DARTS evaluation code (SPEC §7):

* cell: input 0 through FactorizedReduce if the previous cell reduced, else
  ReLU-Conv1x1-BN; input 1 through ReLU-Conv1x1-BN; node i = Σ of its
  genotype edges (edges leaving the two inputs stride 2 in a reduction cell);
  output = channel concat of ``genotype.concat``. An edge whose op is 'none'
  is not computed (it has no parameters); a node left without inputs is zeros.
* drop-path (training only): each edge output except the identity
  (skip_connect stride 1) is zeroed per sample with probability ``rate`` and
  rescaled by 1/(1 - rate). ``rate`` is an array argument, so the linear ramp
  over training never retraces the step.
* auxiliary head after cell 2L//3 (training only).

Shapes: images [N, H, W, 3] -> (logits [N, classes], aux logits [N, classes]
or None).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from snas_jax import ops
from snas_jax.genotypes import NUM_INPUT_STATES, Genotype, reduction_layers

AUX_SCOPE = 'auxiliary_head'  # parameter subtree excluded from the paper's counts


def drop_path(x: jax.Array, rate: jax.Array, rng: jax.Array) -> jax.Array:
  """Zeroes whole samples of x [N, ...] with probability ``rate``, scales the rest by 1/keep.

  E[output] = x. With rate 0 the mask is all ones (bernoulli(p=1) is always
  true), so the identity needs no Python branch on the traced rate.
  """
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * mask.astype(x.dtype) / keep


def _conv(features: int, kernel: int, stride: int, c_in: int, name: str, padding=1):
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding, use_bias=False,
                 kernel_init=ops.torch_uniform_init(kernel * kernel * c_in), name=name)


def _bn(train: bool, name: str, affine: bool = True):
  return nn.BatchNorm(use_running_average=not train, momentum=ops.BN_MOMENTUM,
                      epsilon=ops.BN_EPSILON, use_scale=affine, use_bias=affine, name=name)


def _dense(features: int, c_in: int, name: str):
  return nn.Dense(features, kernel_init=ops.torch_uniform_init(c_in),
                  bias_init=ops.torch_uniform_init(c_in), name=name)


class ChildCell(nn.Module):
  """One derived cell: s0, s1 [N,H,W,C_prev*] -> [N,H',W',len(concat)·C].

  ``cell``: per node, ((op name, input state), ...) (``Genotype.normal`` or
  ``.reduce``). ``drop_rate`` is a scalar array; it only acts when ``train``.
  """
  cell: tuple
  concat: tuple
  c: int
  reduction: bool
  reduction_prev: bool
  impl: str = 'auto'
  remat: bool = False  # passed to the ops (see _ChildNetwork)

  @nn.compact
  def __call__(self, s0, s1, drop_rate, train: bool):
    one_edge = lambda x: x[None]  # [N,H,W,C] -> [S=1,N,H,W,C]
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(self.c, name='preprocess0')(one_edge(s0), train)
    else:
      s0 = ops.ReLUConvBN(self.c, name='preprocess0')(one_edge(s0), train)
    s1 = ops.ReLUConvBN(self.c, name='preprocess1')(one_edge(s1), train)
    states = [s0[0], s1[0]]
    n, h, w, c = states[1].shape
    # Every op of a stride-2 edge yields ceil(H/2) (pad 'same', stride 2).
    node_shape = (n, -(-h // 2), -(-w // 2), c) if self.reduction else (n, h, w, c)
    for node, edges in enumerate(self.cell):
      total = None
      for j, (name, state) in enumerate(edges):
        stride = 2 if self.reduction and state < NUM_INPUT_STATES else 1
        op = ops.make_op(name, self.c, stride, affine=True, impl=self.impl, remat=self.remat,
                         op_name=f'node{node}_edge{j}_{name}')
        if op is None:  # 'none': nothing to compute, no parameters
          continue
        y = op(one_edge(states[state]), train)[0]
        if train and not isinstance(op, ops.Identity):
          y = drop_path(y, drop_rate, self.make_rng('dropout'))
        total = y if total is None else total + y
      states.append(jnp.zeros(node_shape, states[1].dtype) if total is None else total)
    return jnp.concatenate([states[i] for i in self.concat], axis=-1)


class AuxiliaryHead(nn.Module):
  """ReLU, avgpool 5 (no padding), 1x1 conv 128, BN, ReLU, 2x2 conv 768, [BN], ReLU, Dense.

  x [N,H,W,C] -> [N, num_classes]. CIFAR: pool stride 3 on 8x8; ImageNet:
  stride 2 on 7x7 (224 input), and no BN after the 768 conv: the DARTS/SNAS
  ImageNet head omits it (a typo they kept for the published runs).
  """
  num_classes: int
  pool_stride: int
  bn_after_768: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    h, w = x.shape[1:3]
    if min(h, w) < 5 + self.pool_stride:
      raise ValueError(f'the auxiliary head needs a feature map of at least {5 + self.pool_stride}'
                       f'x{5 + self.pool_stride} after cell 2L//3, got {h}x{w}; use larger '
                       f'images or --auxiliary_weight=0')
    x = nn.avg_pool(nn.relu(x), (5, 5), (self.pool_stride, self.pool_stride), padding='VALID')
    x = nn.relu(_bn(train, 'bn0')(_conv(128, 1, 1, x.shape[-1], 'conv0', padding=0)(x)))
    x = _conv(768, 2, 1, 128, 'conv1', padding='VALID')(x)
    if self.bn_after_768:
      x = _bn(train, 'bn1')(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return _dense(self.num_classes, x.shape[-1], 'classifier')(x)


class _ChildNetwork(nn.Module):
  """Shared cell stack; subclasses give the stem and the auxiliary head geometry."""
  genotype: Genotype
  c: int
  layers: int
  num_classes: int
  auxiliary: bool = True
  remat: bool = False
  impl: str = 'auto'

  def stem(self, images, train: bool):
    raise NotImplementedError

  # (first cell reads a reduced s0?, aux pool stride, aux BN after the 768 conv)
  reduction_prev_at_start = False
  aux_pool_stride = 3
  aux_bn_after_768 = True

  @nn.compact
  def __call__(self, images, drop_rate, train: bool):
    """images [N,H,W,3], drop_rate scalar -> (logits [N,K], aux logits [N,K] or None)."""
    s0, s1 = self.stem(images, train)
    # remat: whole cells on the 'lax' path, the convolutions' VJP on XLA:CPU
    # (as search_model.SearchNetwork, which says why).
    remat_cells = self.remat and ops.resolve_impl(self.impl) == 'lax'
    cell_cls = nn.remat(ChildCell, static_argnums=(4,)) if remat_cells else ChildCell
    c_cell, reduction_prev = self.c, self.reduction_prev_at_start
    reductions = reduction_layers(self.layers)
    aux_logits = None
    for i in range(self.layers):
      reduction = i in reductions
      if reduction:
        c_cell *= 2
      cell = self.genotype.reduce if reduction else self.genotype.normal
      s0, s1 = s1, cell_cls(cell, self.genotype.concat, c_cell, reduction, reduction_prev,
                            self.impl, self.remat, name=f'cell_{i}')(s0, s1, drop_rate, train)
      reduction_prev = reduction
      if i == 2 * self.layers // 3 and self.auxiliary and train:
        aux_logits = AuxiliaryHead(self.num_classes, self.aux_pool_stride, self.aux_bn_after_768,
                                   name=AUX_SCOPE)(s1, train)
    x = jnp.mean(s1, axis=(1, 2))
    return _dense(self.num_classes, x.shape[-1], 'classifier')(x), aux_logits


class NetworkCIFAR(_ChildNetwork):
  """Stem conv3x3 3->3C + BN, L cells (reductions at L//3, 2L//3), GAP -> Dense."""
  stem_multiplier: int = 3

  def stem(self, images, train):
    c_stem = self.stem_multiplier * self.c
    x = _bn(train, 'stem_bn')(_conv(c_stem, 3, 1, images.shape[-1], 'stem_conv')(images))
    return x, x


class NetworkImageNet(_ChildNetwork):
  """Three stride-2 stem convs (224 -> 28), L cells, GAP -> Dense.

  stem0 = conv3x3/2 3->C/2, BN, ReLU, conv3x3/2 C/2->C, BN (H/4);
  stem1 = ReLU, conv3x3/2 C->C, BN (H/8). The cells start from (stem0,
  stem1) with reduction_prev=True: s0 is twice s1's size, so cell 0 reduces it.
  """
  reduction_prev_at_start = True
  aux_pool_stride = 2
  aux_bn_after_768 = False

  def stem(self, images, train):
    c = self.c
    x = _conv(c // 2, 3, 2, images.shape[-1], 'stem0_conv0')(images)
    x = nn.relu(_bn(train, 'stem0_bn0')(x))
    s0 = _bn(train, 'stem0_bn1')(_conv(c, 3, 2, c // 2, 'stem0_conv1')(x))
    s1 = _bn(train, 'stem1_bn')(_conv(c, 3, 2, c, 'stem1_conv')(nn.relu(s0)))
    return s0, s1
