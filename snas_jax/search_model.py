"""The SNAS search network: a stack of cells whose 14 edges mix all 8 ops.

The network takes the edge weights ``z_normal`` and ``z_reduce`` ([14, 8] each)
as inputs, so one network serves SNAS (Gumbel-softmax samples), the derived
child evaluated without finetuning (one-hot Z) and the DARTS baseline
(softmax(α)). Sampling lives in ``sampling.py``; this module is deterministic
given Z (except drop-path).

Speed: the edges leaving one state read the same input, so they are computed
as one batch (``ops.py``'s edge axis): a cell runs 4 edge batches instead of
14 edges x 8 ops — the 8 edges from the two cell inputs first (they need no
intermediate node), then the 3, 2 and 1 edges leaving nodes 0, 1 and 2.
This keeps the traced graph (compile time) and the kept activations small.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import jax.numpy as jnp
from flax import linen as nn

from snas_jax import ops
from snas_jax.genotypes import (NUM_EDGES, NUM_INPUT_STATES, NUM_NODES, NUM_OPS, PRIMITIVES,
                                node_edge_slice, reduction_layers)


@functools.lru_cache(maxsize=None)
def edge_batches() -> tuple:
  """The cell's edges grouped by source: ((sources, destinations, rows), ...).

  Edge ``g`` of a batch reads ``sources[g % S]`` and feeds node
  ``destinations[g // S]``; ``rows[g]`` is its row in α / Z.
  """
  batches = []
  first_nodes = tuple(range(NUM_NODES))
  inputs = tuple(range(NUM_INPUT_STATES))
  batches.append((inputs, first_nodes,
                  tuple(node_edge_slice(d).start + s for d in first_nodes for s in inputs)))
  for node in range(NUM_NODES - 1):
    state = node + NUM_INPUT_STATES
    dests = tuple(range(node + 1, NUM_NODES))
    batches.append(((state,), dests, tuple(node_edge_slice(d).start + state for d in dests)))
  return tuple(batches)


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
                          name=f'edges_from_{"_".join(map(str, sources))}')(
                              x, jnp.asarray(z)[np.array(rows)], scale)
      for d, node_input in zip(dests, inputs):
        nodes[d] = nodes[d] + node_input
      states.append(nodes[b])  # node b has all its inputs once batch b is done
    return jnp.concatenate(nodes, axis=-1)


class SearchNetwork(nn.Module):
  """Stem -> L search cells -> global average pool -> Dense.

  ``__call__(images [N,H,W,3], z_normal [14,8], z_reduce [14,8], train)`` ->
  logits [N, num_classes]. ``remat`` recomputes more in the backward pass
  (less memory, more compute): each whole cell (``nn.remat``) on the 'lax'
  path (GPU/TPU); on XLA:CPU, where ``nn.remat`` changed neither memory nor
  time (measured), the convolutions' own VJP recomputes their depthwise
  outputs (ops.relu_conv_bn).
  """
  c: int = 16
  num_classes: int = 10
  layers: int = 8
  stem_multiplier: int = 3
  drop_path: float = 0.0
  remat: bool = False
  impl: str = 'auto'

  @nn.compact
  def __call__(self, images, z_normal, z_reduce, train: bool):
    for name, z in (('z_normal', z_normal), ('z_reduce', z_reduce)):
      if z.shape != (NUM_EDGES, NUM_OPS):
        raise ValueError(f'{name} must be [{NUM_EDGES}, {NUM_OPS}], got {list(z.shape)}')
    c_stem = self.stem_multiplier * self.c
    x = nn.Conv(c_stem, (3, 3), padding=1, use_bias=False, name='stem_conv',
                kernel_init=ops.torch_uniform_init(3 * 3 * images.shape[-1]))(images)
    x = nn.BatchNorm(use_running_average=not train, momentum=ops.BN_MOMENTUM,
                     epsilon=ops.BN_EPSILON, name='stem_bn')(x)
    remat_cells = self.remat and ops.resolve_impl(self.impl) == 'lax'
    cell_cls = nn.remat(SearchCell) if remat_cells else SearchCell
    s0 = s1 = x
    c_cell, reduction_prev = self.c, False
    reductions = reduction_layers(self.layers)
    for i in range(self.layers):
      reduction = i in reductions
      if reduction:
        c_cell *= 2
      cell = cell_cls(c_cell, reduction, reduction_prev, train, self.drop_path, self.impl,
                      self.remat, name=f'cell_{i}')
      s0, s1 = s1, cell(s0, s1, z_reduce if reduction else z_normal)
      reduction_prev = reduction
    x = jnp.mean(s1, axis=(1, 2))
    return nn.Dense(self.num_classes, name='classifier',
                    kernel_init=ops.torch_uniform_init(x.shape[-1]),
                    bias_init=ops.torch_uniform_init(x.shape[-1]))(x)
