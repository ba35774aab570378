"""The CPU backend's forms of the DARTS cells' modules (``search_model.Forms``
of ``spaces/darts/``), plugged into the reference cells (``search_model.SearchCell``,
``child_model.ChildCell``): one cell loop serves both backends.

The edges leaving one state run as ``MixedEdges``: every op of every edge of
the batch with edge-batched parameters (as the reference's vmapped edge
batch: [G,K,K,1,C] depthwise kernels, [G,1,1,C,F] 1x1 kernels, [G,C] BN
vectors), summed into their nodes by ``ops.mix_edges``, whose VJP keeps only
the terms. Ops whose result is the same for every edge
leaving a source (identity; pools, whose BN has no affine parameters here)
are computed once per source. A child edge and the preprocessing run the
same ops with one edge (S = fan_out = 1). Every op declares the reference
module's variables (paths and shapes: ``edge_axis``, ``EdgeBatchNorm``) and
reshapes or transposes its kernels inside, so the reference's variables run
both backends unconverted.
"""
from __future__ import annotations

import functools

import numpy as np
from flax import linen as nn
import jax.numpy as jnp

from snas_jax.backends.cpu import ops
from snas_jax.spaces.darts import search_model as reference
from snas_jax.spaces.darts.genotypes import PRIMITIVES


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
      op = ops.make_op(name, self.c, self.stride, fan_out=self.fan_out, affine=False,
                       impl=self.impl, remat=self.remat, share=True, op_name=name)
      if op is None:  # 'none' contributes Z·0: nothing to compute
        continue
      # DilConvs hand their output before BN to mix_edges, which normalises it
      raw = isinstance(op, (ops.DilConv, ops.SepConv))
      terms.append(op(x, self.train, raw=True) if raw else op(x, self.train))
      columns.append(k)
    return ops.mix_edges(tuple(terms), z[:, np.array(columns)], keep, self.fan_out)


def _edge_batch(states, z, rows, keep, *, c, stride, train, name, impl, remat):
  """``search_model.mix_edge_batch`` as one ``MixedEdges`` on the S sources
  (each read once, not once per edge); the gradient reaching them is
  materialized once (``ops.materialize_grad``)."""
  x = ops.materialize_grad(jnp.stack(states))
  return MixedEdges(c, stride, len(rows) // len(states), train, impl, remat, name=name)(
      x, jnp.asarray(z)[np.array(rows)], keep)


def _one_state(module):
  """A module on [S=1,N,H,W,C] as one on a state [N,H,W,C]."""
  return lambda x, train: module(x[None], train)[0]


def _relu_conv_bn(c_out, *, affine, name):
  return _one_state(ops.ReLUConvBN(c_out, affine=affine, name=name))


def _factorized_reduce(c_out, *, affine, name):
  return _one_state(ops.FactorizedReduce(c_out, affine=affine, edge_axis=False, name=name))


def _op(name, c, stride, *, affine=True, op_name=None, impl, remat):
  op = ops.make_op(name, c, stride, affine=affine, impl=impl, remat=remat, edge_axis=False,
                   op_name=op_name)
  return None if op is None else _one_state(op)


@functools.cache
def forms(impl: str, remat: bool = False) -> reference.Forms:
  """This backend's forms with op implementation ``impl``; ``remat`` goes to
  the ops (the DilConv's VJP recomputes more): on XLA:CPU a recomputed whole
  cell saved neither memory nor time (measured), so cells are not remat'd."""
  return reference.Forms(relu_conv_bn=_relu_conv_bn, factorized_reduce=_factorized_reduce,
                         op=functools.partial(_op, impl=impl, remat=remat),
                         edge_batch=functools.partial(_edge_batch, impl=impl, remat=remat),
                         remat_cells=False)
