"""The SNAS search network: a stack of cells whose 14 edges mix all 8 ops.

The reference model (docs/algorithm.md §1): intermediate node j of a cell is

    x_j = Σ_{i<j} Σ_k Z[(i,j), k] · op_k(x_i)

with Z the edge weights of that cell type — Gumbel-softmax samples for SNAS,
one-hot for the derived child evaluated inside the supernet, softmax(α) for
DARTS. The network takes Z {'normal', 'reduce'}: [14, 8] as an input, so
sampling (``sampling.py``) stays outside and this module is deterministic
given Z, except drop-path.

The edges leaving the same states run as one ``nn.vmap`` of ``MixedOp`` (each
edge with its own weights: parameters carry a leading edge axis): four
batches per cell instead of 14 edges, so accelerators compile a small graph.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from snas_jax import ops
from snas_jax.spaces.darts.genotypes import (NUM_EDGES, NUM_INPUT_STATES, NUM_NODES, NUM_OPS,
                                             PRIMITIVES, edge_batches, reduction_layers)


class MixedOp(nn.Module):
  """One edge: Σ_k z[k] · op_k(x). x [N,H,W,C], z [8] -> [N,H',W',C].

  BatchNorms are non-affine in the search network, as the authors'.
  """
  c: int
  stride: int
  train: bool

  @nn.compact
  def __call__(self, x, z):
    out, z = 0.0, jnp.asarray(z, jnp.float32)  # not weakly typed: the sum stays float32
    for k, name in enumerate(PRIMITIVES):
      op = ops.make_op(name, self.c, self.stride, affine=False, op_name=name)
      if op is not None:  # 'none' is the zero op: z[k]·0 adds nothing
        out = out + z[k] * op(x, self.train)
    # The sum in float32 (z is), so that z's gradient, a sum over N·H·W·C
    # products, accumulates in float32 as well; the edge's output in x's dtype.
    return out.astype(x.dtype)


# A batch of edges: x [G,N,H,W,C], z [G,8] -> [G,N,H',W',C], every variable with a leading G axis.
EdgeBatch = nn.vmap(MixedOp, in_axes=(0, 0), out_axes=0,
                    variable_axes={'params': 0, 'batch_stats': 0}, split_rngs={'params': True})


def edge_batch_name(sources) -> str:
  return f'edges_from_{"_".join(map(str, sources))}'


class SearchCell(nn.Module):
  """One search cell: s0, s1 [N,H,W,C_prev*], z [14, 8] -> [N,H',W',4C].

  ``drop_path``: in training each edge's output is zeroed per image with this
  probability and the rest scaled by 1/(1 − p).
  """
  c: int
  reduction: bool
  reduction_prev: bool
  train: bool
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, s0, s1, z):
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(self.c, affine=False, name='preprocess0')(s0, self.train)
    else:
      s0 = ops.ReLUConvBN(self.c, affine=False, name='preprocess0')(s0, self.train)
    s1 = ops.ReLUConvBN(self.c, affine=False, name='preprocess1')(s1, self.train)
    states = [s0, s1]
    nodes = [0.0] * NUM_NODES
    for b, (sources, dests, rows) in enumerate(edge_batches()):
      # Edges leaving the cell inputs stride 2 in a reduction cell.
      stride = 2 if self.reduction and sources[0] < NUM_INPUT_STATES else 1
      x = jnp.stack([states[s] for s in sources] * len(dests))  # edge g reads sources[g % S]
      y = EdgeBatch(self.c, stride, self.train, name=edge_batch_name(sources))(
          x, jnp.asarray(z)[jnp.array(rows)])
      y = y * drop_path_scale(self, y.shape[:2], y.dtype)
      for i, d in enumerate(dests):  # node d += Σ over its edges in this batch
        nodes[d] = nodes[d] + y[i * len(sources):(i + 1) * len(sources)].sum(0)
      states.append(nodes[b])  # node b has all its inputs once batch b is done
    return jnp.concatenate(nodes, axis=-1)


def drop_path_scale(cell: nn.Module, edges_by_images, dtype) -> jax.Array:
  """Per-(edge, image) drop-path scale [G,N,1,1,1] in ``dtype``: Bernoulli(1 − p)/(1 − p)
  in training with p = ``cell.drop_path`` > 0, else ones."""
  g, n = edges_by_images
  if cell.train and cell.drop_path > 0:
    keep = 1.0 - cell.drop_path
    scale = jax.random.bernoulli(cell.make_rng('dropout'), keep, (g, n)) / keep
  else:
    scale = jnp.ones((g, 1))
  return scale.reshape(scale.shape + (1, 1, 1)).astype(dtype)


class SearchNetwork(nn.Module):
  """Stem -> L search cells -> global average pool -> Dense.

  ``__call__(images [N,H,W,3], z {'normal': [14,8], 'reduce': [14,8]}, train)`` ->
  logits [N, num_classes]. Reduction cells at L//3 and 2L//3 double the
  channels. ``remat`` recomputes each cell in the backward pass (less
  memory, more compute). ``dtype``: what the convolutions and activations
  compute in (mixed precision with bfloat16); parameters, BN statistics and
  the logits stay float32.
  """
  c: int = 16
  num_classes: int = 10
  layers: int = 8
  stem_multiplier: int = 3
  drop_path: float = 0.0
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  def make_cell(self, c: int, reduction: bool, reduction_prev: bool, train: bool, name: str):
    cell_cls = nn.remat(SearchCell) if self.remat else SearchCell
    return cell_cls(c, reduction, reduction_prev, train, self.drop_path, name=name)

  @nn.compact
  def __call__(self, images, z, train: bool):
    from snas_jax.spaces import darts  # the space is built from this module
    darts.SPACE.check_arch_weights(z)
    images = images.astype(self.dtype)  # every op computes in its input's dtype
    x = ops.conv(self.stem_multiplier * self.c, 3, dtype=self.dtype, name='stem_conv')(images)
    x = ops.BatchNorm(name='stem_bn')(x, train)
    s0 = s1 = x
    c_cell, reduction_prev = self.c, False
    reductions = reduction_layers(self.layers)
    for i in range(self.layers):
      reduction = i in reductions
      if reduction:
        c_cell *= 2
      cell = self.make_cell(c_cell, reduction, reduction_prev, train, f'cell_{i}')
      s0, s1 = s1, cell(s0, s1, z['reduce' if reduction else 'normal'])
      reduction_prev = reduction
    x = jnp.mean(s1.astype(jnp.float32), axis=(1, 2))
    return ops.dense(self.num_classes, x.shape[-1], name='classifier')(x)
