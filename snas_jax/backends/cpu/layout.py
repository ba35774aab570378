"""The CPU backend's variable layout, and the pure maps to and from the reference's.

The reference model keeps one array per module variable, with a leading edge
axis G inside an edge batch (``EdgeBatch``): depthwise kernels [G,K,K,1,C],
1x1 kernels [G,1,1,C,F], BN vectors [G,F]. The CPU backend's fused ops want
edge-batched arrays in another order: depthwise kernels [K,K,G,C], 1x1
kernels [G,C,F], BN vectors [G·F]; a DilConv holds its BN's variables itself
(``depthwise_kernel``, ``pointwise_kernel``, ``scale``... rather than
``depthwise/kernel``, ``bn/scale``); and a pool's BN without affine
parameters runs once per source ([S·C]: every edge leaving a source has the
same statistics). Everything else (stems, heads, classifier) is the same.

``to_cpu`` and ``to_reference`` are reshapes and transposes of small arrays,
run inside the jitted step; autodiff carries the gradients back through them.
Both are derived from the reference tree alone (no trace of the CPU network).
"""
from __future__ import annotations

import math
import re

import jax.numpy as jnp
from flax import traverse_util

_POINTWISE = ('conv', 'conv_1', 'conv_2', 'pointwise')
_BN_LEAVES = ('scale', 'bias', 'mean', 'var')
_SHARED_POOLS = ('max_pool_3x3', 'avg_pool_3x3')
_EDGE_BATCH = re.compile(r'edges_from_([\d_]+)$')


def _dilconv_modules(flat_params) -> set:
  """Paths of the DilConv modules: those holding a 'depthwise' conv."""
  return {path[:-2] for path in flat_params if path[-2:] == ('depthwise', 'kernel')}


def _cpu_path(path: tuple, dilconvs: set) -> tuple:
  if path[-2:] in (('depthwise', 'kernel'), ('pointwise', 'kernel')):
    return path[:-2] + (f'{path[-2]}_kernel',)
  if len(path) > 2 and path[-2] == 'bn' and path[:-2] in dilconvs:
    return path[:-2] + (path[-1],)
  return path


def _sources(path: tuple) -> int | None:
  """How many states a shared pool's BN runs for (S), or None if not one."""
  for i, key in enumerate(path[:-1]):
    match = _EDGE_BATCH.match(key)
    if match and path[i + 1] in _SHARED_POOLS:
      return len(match.group(1).split('_'))
  return None


def _kind(path: tuple) -> str:
  if not path[0].startswith('cell_'):
    return 'same'
  if path[-2:] == ('depthwise', 'kernel'):
    return 'depthwise'
  if path[-1] == 'kernel' and path[-2] in _POINTWISE:
    return 'pointwise'
  if path[-1] in _BN_LEAVES:
    return 'shared' if _sources(path) else 'vector'
  return 'same'


def to_cpu(variables: dict) -> dict:
  """Reference-layout variables {collection: tree} -> the CPU backend's."""
  dilconvs = _dilconv_modules(traverse_util.flatten_dict(variables.get('params', {})))
  out = {}
  for col, tree in variables.items():
    flat = {}
    for path, x in traverse_util.flatten_dict(tree).items():
      kind = _kind(path)
      if kind == 'depthwise':  # [*G, K, K, 1, C] -> [K, K, G, C]
        k, c = x.shape[-4], x.shape[-1]
        x = jnp.moveaxis(x.reshape(-1, k, k, c), 0, 2)
      elif kind == 'pointwise':  # [*G, 1, 1, C, F] -> [G, C, F]
        x = x.reshape((-1,) + x.shape[-2:])
      elif kind == 'vector':  # [*G, F] -> [G·F]
        x = x.reshape(-1)
      elif kind == 'shared':  # [D·S, F] -> the first destination's [S·F]
        x = x.reshape(-1)[:_sources(path) * x.shape[-1]]
      flat[_cpu_path(path, dilconvs)] = x
    out[col] = traverse_util.unflatten_dict(flat)
  return out


def to_reference(cpu_variables: dict, like: dict) -> dict:
  """The CPU backend's variables -> the reference layout of ``like`` (a tree
  of arrays or ShapeDtypeStructs with the reference's paths and shapes)."""
  dilconvs = _dilconv_modules(traverse_util.flatten_dict(like.get('params', {})))
  out = {}
  for col, cpu_tree in cpu_variables.items():
    cpu_flat = traverse_util.flatten_dict(cpu_tree)
    flat = {}
    for path, ref in traverse_util.flatten_dict(like[col]).items():
      x = cpu_flat.pop(_cpu_path(path, dilconvs))
      kind = _kind(path)
      if kind == 'depthwise':  # [K, K, G, C] -> [*G, K, K, 1, C]
        x = jnp.moveaxis(x, 2, 0)
      elif kind == 'shared':  # [S·F] -> every destination's copy
        x = jnp.tile(x, math.prod(ref.shape) // x.size)
      flat[path] = x.reshape(ref.shape)
    if cpu_flat:
      raise ValueError(f'CPU variables without a reference place: {sorted(cpu_flat)[:3]}')
    out[col] = traverse_util.unflatten_dict(flat)
  return out
