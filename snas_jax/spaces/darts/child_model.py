"""The child networks retrained from a genotype: NetworkCIFAR, NetworkImageNet.

The reference model (docs/algorithm.md §7). A child cell computes only its
genotype's edges, each with the op module of ``ops.make_op`` (affine BN) —
the very op the search cell mixes. Structure follows the SNAS/DARTS
evaluation code:

* cell: input 0 through FactorizedReduce if the previous cell reduced, else
  ReLU-Conv1x1-BN; input 1 through ReLU-Conv1x1-BN; node i = Σ of its
  genotype edges (edges leaving the two inputs stride 2 in a reduction cell);
  output = channel concat of ``genotype.concat``. An edge whose op is 'none'
  is not computed (it has no parameters); a node left without inputs is zeros.
* drop-path (training only): each edge output except the identity
  (skip_connect stride 1) is zeroed per sample with probability ``rate`` and
  rescaled by 1/(1 - rate) (``layers.drop_path``). ``rate`` is an array argument, so the linear ramp
  over training never retraces the step.
* auxiliary head after cell 2L//3 (training only).

Initialisation: PyTorch's defaults (``snas_jax/layers.py``); training with
``--init=snas`` re-initialises them as the SNAS authors' evaluation code
(``layers.reinitialize``).

Shapes: images [N, H, W, 3] -> (logits [N, classes], aux logits [N, classes]
or None).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import linen as nn

from snas_jax import layers
from snas_jax.layers import drop_path
from snas_jax.spaces.darts.genotypes import NUM_INPUT_STATES, Genotype, reduction_layers
from snas_jax.spaces.darts.search_model import REFERENCE, Forms

AUX_SCOPE = 'auxiliary_head'  # parameter subtree excluded from the paper's counts


def _conv(features: int, kernel: int, stride: int, name: str, padding=1, dtype=jnp.float32):
  pad = ((padding, padding),) * 2 if isinstance(padding, int) else padding
  return layers.conv(features, kernel, stride, padding=pad, dtype=dtype, name=name)


def _bn(x, train: bool, name: str):
  return layers.BatchNorm(name=name)(x, train)


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
  forms: Forms = REFERENCE

  @nn.compact
  def __call__(self, s0, s1, drop_rate, train: bool):
    forms = self.forms
    if self.reduction_prev:
      s0 = forms.factorized_reduce(self.c, affine=True, name='preprocess0')(s0, train)
    else:
      s0 = forms.relu_conv_bn(self.c, affine=True, name='preprocess0')(s0, train)
    s1 = forms.relu_conv_bn(self.c, affine=True, name='preprocess1')(s1, train)
    states = [s0, s1]
    n, h, w, c = s1.shape
    # Every op of a stride-2 edge yields ceil(H/2) (pad 'same', stride 2).
    node_shape = (n, -(-h // 2), -(-w // 2), c) if self.reduction else (n, h, w, c)
    for node, edges in enumerate(self.cell):
      total = None
      for j, (name, state) in enumerate(edges):
        stride = 2 if self.reduction and state < NUM_INPUT_STATES else 1
        op = forms.op(name, self.c, stride, affine=True, op_name=f'node{node}_edge{j}_{name}')
        if op is None:  # 'none': nothing to compute, no parameters
          continue
        y = op(states[state], train)
        if train and not (name == 'skip_connect' and stride == 1):  # the identity
          y = drop_path(y, drop_rate, self.make_rng('dropout'))
        total = y if total is None else total + y
      states.append(jnp.zeros(node_shape, s1.dtype) if total is None else total)
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
    x = nn.relu(_bn(_conv(128, 1, 1, 'conv0', padding=0, dtype=x.dtype)(x), train, 'bn0'))
    x = _conv(768, 2, 1, 'conv1', padding='VALID', dtype=x.dtype)(x)
    if self.bn_after_768:
      x = _bn(x, train, 'bn1')
    x = nn.relu(x).reshape(x.shape[0], -1)
    return layers.dense(self.num_classes, x.shape[-1], name='classifier')(x)


class _ChildNetwork(nn.Module):
  """Shared cell stack; subclasses give the stem and the auxiliary head geometry."""
  genotype: Genotype
  c: int
  layers: int
  num_classes: int
  auxiliary: bool = True
  remat: bool = False  # recompute each cell in the backward pass (less memory)
  dtype: jnp.dtype = jnp.float32  # convolutions and activations (parameters, BN stats: float32)
  forms: Forms = REFERENCE  # what the cells run (a backend binds its own)

  def stem(self, images, train: bool):
    raise NotImplementedError

  def make_cell(self, cell: tuple, c: int, reduction: bool, reduction_prev: bool, name: str):
    remat = self.remat and self.forms.remat_cells
    cell_cls = nn.remat(ChildCell, static_argnums=(4,)) if remat else ChildCell
    return cell_cls(cell, self.genotype.concat, c, reduction, reduction_prev, self.forms,
                    name=name)

  # (first cell reads a reduced s0?, aux pool stride, aux BN after the 768 conv)
  reduction_prev_at_start = False
  aux_pool_stride = 3
  aux_bn_after_768 = True

  @nn.compact
  def __call__(self, images, drop_rate, train: bool):
    """images [N,H,W,3], drop_rate scalar -> (logits [N,K], aux logits [N,K] or None)."""
    s0, s1 = self.stem(images.astype(self.dtype), train)  # every op follows its input's dtype
    c_cell, reduction_prev = self.c, self.reduction_prev_at_start
    reductions = reduction_layers(self.layers)
    aux_logits = None
    for i in range(self.layers):
      reduction = i in reductions
      if reduction:
        c_cell *= 2
      cell = self.genotype.reduce if reduction else self.genotype.normal
      s0, s1 = s1, self.make_cell(cell, c_cell, reduction, reduction_prev, f'cell_{i}')(
          s0, s1, drop_rate, train)
      reduction_prev = reduction
      if i == 2 * self.layers // 3 and self.auxiliary and train:
        aux_logits = AuxiliaryHead(self.num_classes, self.aux_pool_stride, self.aux_bn_after_768,
                                   name=AUX_SCOPE)(s1, train)
    x = jnp.mean(s1.astype(jnp.float32), axis=(1, 2))
    return layers.dense(self.num_classes, x.shape[-1], name='classifier')(x), aux_logits


class NetworkCIFAR(_ChildNetwork):
  """Stem conv3x3 3->3C + BN, L cells (reductions at L//3, 2L//3), GAP -> Dense."""
  stem_multiplier: int = 3

  def stem(self, images, train):
    x = _bn(_conv(self.stem_multiplier * self.c, 3, 1, 'stem_conv', dtype=self.dtype)(images),
            train, 'stem_bn')
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
    conv = functools.partial(_conv, dtype=self.dtype)
    x = nn.relu(_bn(conv(c // 2, 3, 2, 'stem0_conv0')(images), train, 'stem0_bn0'))
    s0 = _bn(conv(c, 3, 2, 'stem0_conv1')(x), train, 'stem0_bn1')
    s1 = _bn(conv(c, 3, 2, 'stem1_conv')(nn.relu(s0)), train, 'stem1_bn')
    return s0, s1
