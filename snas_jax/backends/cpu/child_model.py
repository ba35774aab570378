"""The child networks on the CPU backend: the reference networks
(``snas_jax.child_model``) with cells built from this backend's ops (one edge:
S = fan_out = 1; native or shift depthwise convs and pools, the DilConv's
fused VJP). Variable names match the reference's; ``layout`` converts shapes.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from snas_jax import child_model as reference
from snas_jax.backends.cpu import ops
from snas_jax.spaces.darts.genotypes import NUM_INPUT_STATES


class ChildCell(nn.Module):
  """``reference.ChildCell`` with this backend's ops."""
  cell: tuple
  concat: tuple
  c: int
  reduction: bool
  reduction_prev: bool
  impl: str = 'native'
  remat: bool = False  # passed to the ops: the DilConv's VJP recomputes more

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
    node_shape = (n, -(-h // 2), -(-w // 2), c) if self.reduction else (n, h, w, c)
    for node, edges in enumerate(self.cell):
      total = None
      for j, (name, state) in enumerate(edges):
        stride = 2 if self.reduction and state < NUM_INPUT_STATES else 1
        op = ops.make_op(name, self.c, stride, affine=True, impl=self.impl, remat=self.remat,
                         op_name=f'node{node}_edge{j}_{name}')
        if op is None:
          continue
        y = op(one_edge(states[state]), train)[0]
        if train and not isinstance(op, ops.Identity):
          y = reference.drop_path(y, drop_rate, self.make_rng('dropout'))
        total = y if total is None else total + y
      states.append(jnp.zeros(node_shape, states[1].dtype) if total is None else total)
    return jnp.concatenate([states[i] for i in self.concat], axis=-1)


class _CpuCells:
  """Builds this backend's cells; ``remat`` goes to the ops (on XLA:CPU a
  recomputed whole cell saved neither memory nor time, measured)."""
  impl: str = 'native'

  def make_cell(self, cell, c, reduction, reduction_prev, name):
    return ChildCell(cell, self.genotype.concat, c, reduction, reduction_prev, self.impl,
                     self.remat, name=name)


class NetworkCIFAR(_CpuCells, reference.NetworkCIFAR):
  impl: str = 'native'


class NetworkImageNet(_CpuCells, reference.NetworkImageNet):
  impl: str = 'native'


NETWORKS = {reference.NetworkCIFAR: NetworkCIFAR, reference.NetworkImageNet: NetworkImageNet}
