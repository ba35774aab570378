"""The layers every search space builds its ops and networks from, as plain Flax Linen modules.

Named layers, not ops: an op is one of a space's candidate operations on an
edge, chosen by its name, and lives in that space's own files
(``spaces/darts/ops.py``, ``spaces/nb201.py``); these pieces name no op and
serve every space: BatchNorm as PyTorch's, bias-free convolutions, the
classifier, the PyTorch initialisers, the identity, drop-path, the name of
an edge batch and the SNAS re-initialisation of a child network.

This is the reference model (docs/algorithm.md §1): what GPUs and TPUs run,
what defines the parameter and BN-statistics trees that checkpoints hold,
and what every backend must equal. Images are NHWC, every conv is bias-free.
Every layer computes in its input's dtype (mixed precision: the network
casts its images once, docs/algorithm.md §5) while its parameters stay
float32; BatchNorm takes its batch statistics in float32 and keeps its
running ones there.

BatchNorm follows torch.nn.BatchNorm2d (momentum 0.1, ε 1e-5, the running
variance updated with the unbiased batch variance), and the initialisers
PyTorch's defaults (U(±1/sqrt(fan_in)) for conv and dense weights and dense
biases), as the authors' code.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

BN_MOMENTUM = 0.1  # PyTorch's convention: running = (1 - m)·running + m·batch
BN_EPSILON = 1e-5
INITS = ('snas', 'pytorch')  # what ``reinitialize`` draws a child network's parameters from

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


class Identity(nn.Module):
  """x -> x, called as every layer: ``(x, train)``."""

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return x


def edge_batch_name(sources) -> str:
  """The variable scope of the edges leaving the states ``sources``, batched as one module."""
  return f'edges_from_{"_".join(map(str, sources))}'


def drop_path(x: jax.Array, rate: jax.Array, rng: jax.Array) -> jax.Array:
  """Zeroes whole samples of x [N, ...] with probability ``rate``, scales the rest by 1/keep.

  E[output] = x. With rate 0 the mask is all ones (bernoulli(p=1) is always
  true), so the identity needs no Python branch on the traced rate.
  """
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)


def drop_path_scale(cell: nn.Module, edges_by_images) -> jax.Array:
  """Per-(edge, image) drop-path scale [G, N], float32: Bernoulli(1 − p)/(1 − p)
  in training with p = ``cell.drop_path`` > 0, else ones [G, 1]."""
  g, n = edges_by_images
  if cell.train and cell.drop_path > 0:
    keep = 1.0 - cell.drop_path
    return jax.random.bernoulli(cell.make_rng('dropout'), keep, (g, n)) / keep
  return jnp.ones((g, 1))


def reinitialize(params, init: str, seed: int) -> dict:
  """A child network's parameters under ``init`` (``INITS``): 'pytorch' returns
  them unchanged (PyTorch's defaults, as DARTS's code); 'snas' draws every conv kernel [kh, kw, C_in/groups,
  C_out] from N(0, 2/(kh·kw·C_out)), every dense kernel [fan_in, F] from
  N(0, 2/fan_in) and zeroes the classifiers' biases, as the SNAS authors'
  evaluation code (BN scale 1, bias 0 in both).
  Drawn on the host with NumPy (seeded by ``seed``): one XLA:CPU kernel per
  random draw would take longer to compile than the draws take to run."""
  if init == 'pytorch':
    return params
  if init != 'snas':
    raise ValueError(f'unknown --init {init!r}; choose one of {", ".join(INITS)}')
  rng = np.random.default_rng([seed, 7])
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, x in leaves:
    name = getattr(path[-1], 'key', '')
    parent = getattr(path[-2], 'key', '') if len(path) > 1 else ''
    if name == 'kernel' and x.ndim == 4:  # conv
      std = math.sqrt(2.0 / (x.shape[0] * x.shape[1] * x.shape[-1]))
      x = (std * rng.standard_normal(x.shape)).astype(np.float32)
    elif name == 'kernel' and x.ndim == 2:  # dense
      x = (math.sqrt(2.0 / x.shape[0]) * rng.standard_normal(x.shape)).astype(np.float32)
    elif name == 'bias' and parent == 'classifier':
      x = np.zeros(x.shape, np.float32)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)
