"""The search network on the CPU backend: the reference network
(``snas_jax.search_model``) with cells whose edge batches run this backend's
fused ops: ``MixedEdges`` computes the edges leaving one state with
edge-batched parameters ([K,K,G,C] depthwise kernels, [G,C,F] 1x1 kernels,
[G·C] BN vectors) and sums them into their nodes with ``ops.mix_edges``, whose
VJP keeps only the terms. Variable names match the reference's; ``layout``
converts the shapes. Ops whose result is the same for every edge leaving a
source (identity; pools, whose BN has no affine parameters here) are
computed once per source.
"""
from __future__ import annotations


import jax
import numpy as np
import jax.numpy as jnp
from flax import linen as nn

from snas_jax.backends.cpu import ops
from snas_jax import search_model as reference
from snas_jax.spaces.darts.genotypes import (NUM_INPUT_STATES, NUM_NODES, PRIMITIVES,
                                             edge_batches)


class MixedEdges(nn.Module):
  """Σ_k Z[g, k] · op_k(x) for a batch of edges sharing their sources, summed
  into their destination nodes.

  x: [S,N,H,W,C]; z: [G, 8] with G = fan_out·S; keep: [G, N or 1] drop-path
  scales -> tuple of fan_out node inputs [N,H',W',C] (ops.mix_edges). Ops
  whose result is the same for every edge leaving a source (identity; pools,
  whose BN has no affine parameters here) are computed once per source.
  """
  c: int
  stride: int
  fan_out: int
  train: bool
  impl: str = 'auto'
  remat: bool = False

  @nn.compact
  def __call__(self, x, z, keep):
    terms, columns = [], []
    for k, name in enumerate(PRIMITIVES):
      shared = name.endswith('pool_3x3') or (name == 'skip_connect' and self.stride == 1)
      op = ops.make_op(name, self.c, self.stride, fan_out=1 if shared else self.fan_out,
                       affine=False, impl=self.impl, remat=self.remat, op_name=name)
      if op is None:  # 'none' contributes Z·0: nothing to compute
        continue
      # DilConvs hand their output before BN to mix_edges, which normalises it
      raw = isinstance(op, (ops.DilConv, ops.SepConv))
      terms.append(op(x, self.train, raw=True) if raw else op(x, self.train))
      columns.append(k)
    return ops.mix_edges(tuple(terms), z[:, np.array(columns)], keep, self.fan_out)


class SearchCell(nn.Module):
  """One search cell: s0, s1 [N,H,W,C_prev*] -> [N,H',W',4C]."""
  c: int
  reduction: bool
  reduction_prev: bool
  train: bool
  drop_path: float = 0.0
  impl: str = 'auto'
  remat: bool = False  # passed to the ops (see SearchNetwork)

  @nn.compact
  def __call__(self, s0, s1, z):
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(self.c, affine=False, name='preprocess0')(s0[None], self.train)
    else:
      s0 = ops.ReLUConvBN(self.c, affine=False, name='preprocess0')(s0[None], self.train)
    s1 = ops.ReLUConvBN(self.c, affine=False, name='preprocess1')(s1[None], self.train)
    states = [s0[0], s1[0]]
    nodes = [0.0] * NUM_NODES
    for b, (sources, dests, rows) in enumerate(edge_batches()):
      stride = 2 if self.reduction and sources[0] < NUM_INPUT_STATES else 1
      x = ops.materialize_grad(jnp.stack([states[s] for s in sources]))
      n_edges = len(sources) * len(dests)
      if self.train and self.drop_path > 0:
        keep = 1.0 - self.drop_path
        mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (n_edges, x.shape[1]))
        scale = mask / keep
      else:
        scale = jnp.ones((n_edges, 1), x.dtype)
      inputs = MixedEdges(self.c, stride, len(dests), self.train, self.impl, self.remat,
                          name=reference.edge_batch_name(sources))(
                              x, jnp.asarray(z)[np.array(rows)], scale)
      for d, node_input in zip(dests, inputs):
        nodes[d] = nodes[d] + node_input
      states.append(nodes[b])  # node b has all its inputs once batch b is done
    return jnp.concatenate(nodes, axis=-1)


class SearchNetwork(reference.SearchNetwork):
  """``reference.SearchNetwork`` with this backend's cells. ``remat`` goes to
  the ops (the DilConv's VJP recomputes its depthwise output): on XLA:CPU a
  recomputed whole cell saved neither memory nor time (measured)."""
  impl: str = 'native'

  def make_cell(self, c, reduction, reduction_prev, train, name):
    return SearchCell(c, reduction, reduction_prev, train, self.drop_path, self.impl,
                      self.remat, name=name)
