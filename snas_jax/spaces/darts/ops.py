"""The DARTS space's candidate operations, one edge each, as plain Flax Linen
modules: the reference model (docs/algorithm.md §1), built from the shared
layers of ``snas_jax/layers.py`` (BatchNorm as PyTorch's, bias-free convs).
Every op computes in its input's dtype while its parameters stay float32.

| op            | module                                                           |
|---------------|------------------------------------------------------------------|
| none          | not computed (``make_op`` returns None): it contributes Z·0       |
| max_pool_3x3  | ``Pool('max')``: 3x3 max, pad 1 with -inf, stride s -> BN        |
| avg_pool_3x3  | ``Pool('avg')``: 3x3 mean, pad 1 excluded from the count -> BN   |
| skip_connect  | ``Identity``; stride 2: ``FactorizedReduce``                      |
| sep_conv_KxK  | ``SepConv``: DilConv(K, dilation 1, stride s), DilConv(K, 1, 1)  |
| dil_conv_KxK  | ``DilConv``: ReLU -> depthwise KxK dilation 2 -> 1x1 -> BN        |

``ReLUConvBN`` and ``FactorizedReduce`` also preprocess a cell's inputs.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from snas_jax.layers import BatchNorm, Identity, conv
from snas_jax.spaces.darts.genotypes import PRIMITIVES


class ReLUConvBN(nn.Module):
  """ReLU -> 1x1 conv -> BN (a cell's input preprocessing)."""
  c_out: int
  affine: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    y = conv(self.c_out, 1, dtype=x.dtype, name='conv')(nn.relu(x))
    return BatchNorm(self.affine, name='bn')(y, train)


class FactorizedReduce(nn.Module):
  """ReLU -> concat(1x1/2 conv of x, 1x1/2 conv of x shifted by one pixel) -> BN."""
  c_out: int
  affine: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    if self.c_out % 2:
      raise ValueError(f'FactorizedReduce needs an even channel count, got {self.c_out}')
    x = nn.relu(x)
    half = self.c_out // 2
    a = conv(half, 1, 2, padding='VALID', dtype=x.dtype, name='conv_1')(x)
    b = conv(half, 1, 2, padding='VALID', dtype=x.dtype, name='conv_2')(x[:, 1:, 1:, :])
    return BatchNorm(self.affine, name='bn')(jnp.concatenate([a, b], axis=-1), train)


class DilConv(nn.Module):
  """ReLU -> depthwise KxK (stride, dilation) -> 1x1 conv -> BN."""
  c_out: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  affine: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = x.shape[-1]
    x = conv(c_in, self.kernel_size, self.stride, dilation=self.dilation, groups=c_in,
             dtype=x.dtype, name='depthwise')(nn.relu(x))
    x = conv(self.c_out, 1, dtype=x.dtype, name='pointwise')(x)
    return BatchNorm(self.affine, name='bn')(x, train)


class SepConv(nn.Module):
  """DilConv(K, stride s, dilation 1) -> DilConv(K, stride 1, dilation 1)."""
  c_out: int
  kernel_size: int
  stride: int = 1
  affine: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    x = DilConv(x.shape[-1], self.kernel_size, self.stride, 1, self.affine, name='dil_0')(x, train)
    return DilConv(self.c_out, self.kernel_size, 1, 1, self.affine, name='dil_1')(x, train)


class Pool(nn.Module):
  """3x3 max pool (pad with -inf) or average pool (padding excluded from the
  count, PyTorch's count_include_pad=False), then BN as the authors' code."""
  kind: str  # 'max' | 'avg'
  stride: int = 1
  affine: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    window, strides, pad = (3, 3), (self.stride, self.stride), ((1, 1), (1, 1))
    if self.kind == 'max':
      y = nn.max_pool(x, window, strides, pad)
    else:
      # The divisor counts are float32: back to x's dtype.
      y = nn.avg_pool(x, window, strides, pad, count_include_pad=False).astype(x.dtype)
    return BatchNorm(self.affine, name='bn')(y, train)


def make_op(name: str, c: int, stride: int, *, affine: bool = True,
            op_name: str | None = None) -> nn.Module | None:
  """The module of operation ``name`` (one of PRIMITIVES) on an edge with
  ``c`` channels; None for 'none', which is never computed."""
  kw = dict(name=op_name)
  if name == 'none':
    return None
  if name in ('max_pool_3x3', 'avg_pool_3x3'):
    return Pool(name[:3], stride, affine, **kw)
  if name == 'skip_connect':
    return Identity(**kw) if stride == 1 else FactorizedReduce(c, affine, **kw)
  if name in ('sep_conv_3x3', 'sep_conv_5x5'):
    return SepConv(c, int(name[-1]), stride, affine, **kw)
  if name in ('dil_conv_3x3', 'dil_conv_5x5'):
    return DilConv(c, int(name[-1]), stride, 2, affine, **kw)
  raise ValueError(f'unknown op {name!r}; choose one of {", ".join(PRIMITIVES)}')
