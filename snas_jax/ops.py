"""The candidate operations of a cell, one edge each, as plain Flax Linen modules.

This is the reference model (docs/algorithm.md §1): what GPUs and TPUs run,
what defines the parameter and BN-statistics trees that checkpoints hold,
and what every backend must equal. Images are NHWC, every conv is bias-free.

Every op computes in its input's dtype (mixed precision: the network casts
its images once, docs/algorithm.md §5) while its parameters stay float32;
BatchNorm takes its batch statistics in float32 and keeps its running ones
there.

| op            | module                                                           |
|---------------|------------------------------------------------------------------|
| none          | not computed (``make_op`` returns None): it contributes Z·0       |
| max_pool_3x3  | ``Pool('max')``: 3x3 max, pad 1 with -inf, stride s -> BN        |
| avg_pool_3x3  | ``Pool('avg')``: 3x3 mean, pad 1 excluded from the count -> BN   |
| skip_connect  | ``Identity``; stride 2: ``FactorizedReduce``                      |
| sep_conv_KxK  | ``SepConv``: DilConv(K, dilation 1, stride s), DilConv(K, 1, 1)  |
| dil_conv_KxK  | ``DilConv``: ReLU -> depthwise KxK dilation 2 -> 1x1 -> BN        |

BatchNorm follows torch.nn.BatchNorm2d (momentum 0.1, ε 1e-5, the running
variance updated with the unbiased batch variance), and the initialisers
PyTorch's defaults (U(±1/sqrt(fan_in)) for conv and dense weights and dense
biases), as the authors' code.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from snas_jax.spaces.darts.genotypes import PRIMITIVES

BN_MOMENTUM = 0.1  # PyTorch's convention: running = (1 - m)·running + m·batch
BN_EPSILON = 1e-5

# PyTorch's default conv / linear weight init (kaiming_uniform with a=√5):
# U(±1/sqrt(fan_in)), i.e. variance 1/(3·fan_in).
torch_weight_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int):
  """PyTorch's default linear bias init: U(±1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the last axis: x [..., C].

  Training: normalises with the batch mean and biased variance over every
  other axis, and updates the running mean and the running variance with the
  *unbiased* batch variance (n/(n−1) times the biased one, n values per
  channel), as PyTorch; evaluation: normalises with the running statistics.
  Variables: params 'scale', 'bias' [C] (``affine``), batch_stats 'mean', 'var' [C].
  Statistics and normalisation in float32, the output in x's dtype.
  """
  affine: bool = True
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x, train: bool):
    c, dtype = x.shape[-1], x.dtype
    x = x.astype(jnp.float32)  # a bfloat16 mean over N·H·W values would lose digits
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = x.mean(axes)
      var = jnp.square(x - mean).mean(axes)
      n = x.size // c
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * mean
        running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = running_mean.value, running_var.value
    y = (x - mean) * lax.rsqrt(var + self.epsilon)
    if self.affine:
      y = (y * self.param('scale', nn.initializers.ones, (c,))
           + self.param('bias', nn.initializers.zeros, (c,)))
    return y.astype(dtype)


def conv(features: int, kernel: int, stride: int = 1, *, dilation: int = 1, groups: int = 1,
         padding=None, dtype=jnp.float32, name: str | None = None) -> nn.Conv:
  """A bias-free KxK conv computing in ``dtype`` (its kernel stays float32);
  ``padding`` defaults to 'same' for odd K: dilation·(K−1)/2."""
  if padding is None:
    pad = dilation * (kernel - 1) // 2
    padding = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding,
                 kernel_dilation=dilation, feature_group_count=groups, use_bias=False,
                 kernel_init=torch_weight_init, dtype=dtype, name=name)


def dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
  """A float32 dense layer (the classifiers: logits reach the loss in float32)."""
  return nn.Dense(features, kernel_init=torch_weight_init, bias_init=torch_bias_init(fan_in),
                  name=name)


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


class Identity(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return x


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
