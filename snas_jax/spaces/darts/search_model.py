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

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from snas_jax import layers
from snas_jax.layers import drop_path_scale, edge_batch_name
from snas_jax.spaces.darts import ops
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


def mix_edge_batch(states, z, rows, keep, *, c: int, stride: int, train: bool, name: str):
  """The node inputs of one batch of edges, as the reference computes them:
  ``EdgeBatch`` over every (destination, source) pair, edge g = d·S + s reads
  ``states[s]`` and has Z row ``rows[g]``; its output is scaled by ``keep``
  [G, N or 1] (drop-path) and summed into destination d. -> tuple of the
  fan_out = G / S node inputs [N,H',W',C]."""
  n_src, fan_out = len(states), len(rows) // len(states)
  x = jnp.stack(list(states) * fan_out)
  y = EdgeBatch(c, stride, train, name=name)(x, jnp.asarray(z)[jnp.array(rows)])
  y = y * keep.reshape(keep.shape + (1, 1, 1)).astype(y.dtype)
  return tuple(y[d * n_src:(d + 1) * n_src].sum(0) for d in range(fan_out))


@dataclasses.dataclass(frozen=True)
class Forms:
  """What the cells of the DARTS space (``SearchCell`` here, ``child_model.ChildCell``)
  run: the reference modules (``REFERENCE``) or a backend's own forms of them
  (the CPU backend's ``backends.cpu.forms``). Each builds its module inside
  the calling cell, under the name given, so that the variables are named
  as the reference's whichever forms run; one cell loop serves every backend.

  * ``relu_conv_bn(c_out, affine, name)``, ``factorized_reduce(c_out, affine,
    name)``: the cell's input preprocessing, a module called ``(x [N,H,W,C], train)``;
  * ``op(name, c, stride, *, affine, op_name)``: one child edge's op, a module
    called ``(x, train)``, or None for 'none' (never computed);
  * ``edge_batch(states, z, rows, keep, *, c, stride, train, name)``: the node
    inputs of a batch of search edges (``mix_edge_batch``);
  * ``remat_cells``: whether the networks' ``remat`` recomputes whole cells
    (``nn.remat``); False where the forms take ``remat`` into their ops.
  """
  relu_conv_bn: Callable[..., Any]
  factorized_reduce: Callable[..., Any]
  op: Callable[..., Any]
  edge_batch: Callable[..., Any]
  remat_cells: bool = True


REFERENCE = Forms(relu_conv_bn=ops.ReLUConvBN, factorized_reduce=ops.FactorizedReduce,
                  op=ops.make_op, edge_batch=mix_edge_batch)


class SearchCell(nn.Module):
  """One search cell: s0, s1 [N,H,W,C_prev*], z [14, 8] -> [N,H',W',4C].

  ``drop_path``: in training each edge's output is zeroed per image with this
  probability and the rest scaled by 1/(1 − p). ``forms``: the modules it
  runs (``Forms``).
  """
  c: int
  reduction: bool
  reduction_prev: bool
  train: bool
  drop_path: float = 0.0
  forms: Forms = REFERENCE

  @nn.compact
  def __call__(self, s0, s1, z):
    forms = self.forms
    if self.reduction_prev:
      s0 = forms.factorized_reduce(self.c, affine=False, name='preprocess0')(s0, self.train)
    else:
      s0 = forms.relu_conv_bn(self.c, affine=False, name='preprocess0')(s0, self.train)
    s1 = forms.relu_conv_bn(self.c, affine=False, name='preprocess1')(s1, self.train)
    states = [s0, s1]
    nodes = [0.0] * NUM_NODES
    for b, (sources, dests, rows) in enumerate(edge_batches()):
      # Edges leaving the cell inputs stride 2 in a reduction cell.
      stride = 2 if self.reduction and sources[0] < NUM_INPUT_STATES else 1
      keep = drop_path_scale(self, (len(rows), s1.shape[0]))
      inputs = forms.edge_batch([states[s] for s in sources], z, rows, keep, c=self.c,
                                stride=stride, train=self.train, name=edge_batch_name(sources))
      for d, node_input in zip(dests, inputs):  # node d += Σ over its edges in this batch
        nodes[d] = nodes[d] + node_input
      states.append(nodes[b])  # node b has all its inputs once batch b is done
    return jnp.concatenate(nodes, axis=-1)


class SearchNetwork(nn.Module):
  """Stem -> L search cells -> global average pool -> Dense.

  ``__call__(images [N,H,W,3], z {'normal': [14,8], 'reduce': [14,8]}, train)`` ->
  logits [N, num_classes]. Reduction cells at L//3 and 2L//3 double the
  channels. ``remat`` recomputes each cell in the backward pass (less
  memory, more compute). ``dtype``: what the convolutions and activations
  compute in (mixed precision with bfloat16); parameters, BN statistics and
  the logits stay float32. ``forms``: what its cells run (``Forms``; a
  backend binds its own).
  """
  c: int = 16
  num_classes: int = 10
  layers: int = 8
  stem_multiplier: int = 3
  drop_path: float = 0.0
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  forms: Forms = REFERENCE

  def make_cell(self, c: int, reduction: bool, reduction_prev: bool, train: bool, name: str):
    remat = self.remat and self.forms.remat_cells
    cell_cls = nn.remat(SearchCell) if remat else SearchCell
    return cell_cls(c, reduction, reduction_prev, train, self.drop_path, self.forms, name=name)

  @nn.compact
  def __call__(self, images, z, train: bool):
    from snas_jax.spaces import darts  # the space is built from this module
    darts.SPACE.check_arch_weights(z)
    images = images.astype(self.dtype)  # every op computes in its input's dtype
    x = layers.conv(self.stem_multiplier * self.c, 3, dtype=self.dtype, name='stem_conv')(images)
    x = layers.BatchNorm(name='stem_bn')(x, train)
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
    return layers.dense(self.num_classes, x.shape[-1], name='classifier')(x)
