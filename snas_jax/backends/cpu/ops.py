"""The candidate operations of a cell, as Flax Linen modules.

Every op works on *edge-batched* tensors, edge axis leading, so that the
edges leaving one state are computed together (the search cell's main speed
lever, see ``forms.py``):

* input  ``x``: ``[S, N, H, W, C]`` — S distinct source states;
* output:       ``[G, N, H', W', C_out]`` — G = ``fan_out`` · S edges, edge
  ``g = d * S + s`` reads source ``s`` (d indexes the destinations).

Parameters carry an edge axis G, so each edge has its own weights. With
S = fan_out = 1 an op is the plain single-edge op that the child networks use:
one implementation of each op serves search and evaluation. Every module
declares the variables of the reference module it stands for
(``snas_jax/spaces/darts/ops.py``, vmapped over the edges in a search edge batch): same
names, same shapes, the leading edge axis G only where the reference has one
(``edge_axis``); it reshapes and transposes them inside into what its fused
code wants.

Why the edge axis leads: a per-edge 1x1 conv is then a batched matmul over a
leading batch axis and a BN a reduction over the middle axes, with no
transposes; with the edge axis next to the channels XLA:CPU spent about a third
of a search step transposing operands for its matmuls (docs/cpu_backend.md).

The depthwise convolution and max pool have three implementations
(``impl``): ``'native'`` (hand-written C++ custom calls, ``native/``: the
depthwise conv, and in training the whole DilConv and each search cell's
pool with its BN; other pools as 'shift'), ``'shift'`` (a sum/max over K²
shifted views in XLA; what several devices run, since XLA's partitioner
cannot split a custom call) and ``'lax'`` (XLA's convolution / reduce_window:
the compact form that this backend's init and its tests compare against).
The backend picks 'native' on one device, 'shift' on several (``default_impl``).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from snas_jax.backends.cpu import native
from snas_jax.spaces.darts.genotypes import PRIMITIVES

# PyTorch BatchNorm momentum 0.1 == Flax momentum 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def resolve_impl(impl: str) -> str:
  """Checks ``impl``; 'auto': 'native' on a CPU-only single-device run whose
  kernels build, 'shift' on other CPU runs, 'lax' elsewhere.

  Why 'native' needs one device: XLA's SPMD partitioner cannot split a custom
  call, so on a mesh of several devices it would gather the whole batch to
  every device; the XLA ops ('shift') partition like any other.
  """
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'lax'
    if jax.device_count() == 1 and native.available():
      return 'native'
    if jax.device_count() == 1:
      _warn_native_fallback()
    return 'shift'
  if impl not in IMPLS:
    raise ValueError(f'unknown op implementation {impl!r}; use one of {", ".join(IMPLS)}')
  if impl == 'native':
    if jax.default_backend() != 'cpu':
      raise ValueError(f"impl='native' runs on the CPU only, not {jax.default_backend()}; "
                       'use auto or lax')
    native.require()
  return impl


IMPLS = ('auto', 'native', 'shift', 'lax')


@functools.cache
def _warn_native_fallback():
  native.warn_fallback()


def torch_uniform_init(fan_in: int):
  """PyTorch's default conv/linear init: U(±1/sqrt(fan_in)). Inside
  ``init_with_one_draw`` it cuts its numbers from that one shared draw."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    if _UNIFORM_POOLS:
      return (bound * (2.0 * _UNIFORM_POOLS[-1].take(shape) - 1.0)).astype(dtype)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class _UniformPool:
  """Consecutive chunks of one stream of U(0, 1) float32 numbers, drawn on the
  host with NumPy as they are asked for."""

  def __init__(self, key):
    self.rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

  def take(self, shape):
    return self.rng.random(math.prod(shape), dtype=np.float32).reshape(shape)


_UNIFORM_POOLS: list[_UniformPool] = []


def init_with_one_draw(init_fn, key):
  """``init_fn()``, a Flax init, jitted, with every ``torch_uniform_init``
  parameter cut on the host from one stream of U(0, 1) numbers seeded by
  ``key`` (not for jit).

  Why: XLA:CPU expands each random draw into ~500 scalar ops and compiles a
  kernel per output, so the paper network's jitted init (~410 draws) spent
  16-25 s compiling. Here the drawn parameters are NumPy arrays, constants of
  the jitted init (which compiles in a second: the forward pass that Flax's
  init traces is dead code), and the network is traced once. Still a seeded
  U(±bound) per parameter, not Flax's per-path keys.
  """
  _UNIFORM_POOLS.append(_UniformPool(key))
  try:
    return jax.jit(init_fn)()
  finally:
    _UNIFORM_POOLS.pop()


def fan_out_edges(x: jax.Array, fan_out: int) -> jax.Array:
  """[S,N,H,W,C] -> [fan_out*S,N,H,W,C]: each source feeds fan_out edges."""
  if fan_out == 1:
    return x
  return jnp.broadcast_to(x[None], (fan_out,) + x.shape).reshape(
      (fan_out * x.shape[0],) + x.shape[1:])


# ----------------------------------------------------------------------------
# Functional kernels (pure jnp; no parameters of their own). Images are
# [..., H, W, C]: the spatial axes are always the 3rd- and 2nd-last.
# ----------------------------------------------------------------------------

def _out_size(size: int, kernel: int, stride: int, dilation: int, pad: int) -> int:
  return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def _pad_hw(x, pad: int, value=0.0):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)],
                 constant_values=value)


def _shifted_views(xp, kernel, stride, dilation, out_h, out_w):
  """The K² strided windows of padded xp [..., Hp, Wp, C] that a KxK op reads
  (one lax.slice each: the traced graph grows with the taps, so keep them lean)."""
  lead = (0,) * (xp.ndim - 3)
  for i in range(kernel):
    for j in range(kernel):
      start = lead + (i * dilation, j * dilation, 0)
      limit = xp.shape[:-3] + (i * dilation + (out_h - 1) * stride + 1,
                               j * dilation + (out_w - 1) * stride + 1, xp.shape[-1])
      yield i, j, lax.slice(xp, start, limit, (1,) * len(lead) + (stride, stride, 1))


def _per_edge(v, ndim: int):
  """A per-(edge, channel) vector [..., C] broadcast against [..., N, H, W, C]."""
  return v.reshape(v.shape[:-1] + (1,) * (ndim - v.ndim) + v.shape[-1:])


def depthwise_conv(x, kernel, *, stride: int = 1, dilation: int = 1, impl: str = 'auto'):
  """Per-edge depthwise conv with 'same'-style padding dilation*(K-1)/2.

  x: [S,N,H,W,C]; kernel: [K,K,G,C] with G = fan_out*S -> [G,N,H',W',C].
  """
  k, _, g, c = kernel.shape
  s, n, h, w, _ = x.shape
  if resolve_impl(impl) == 'lax':
    pad = dilation * (k - 1) // 2
    xg = jnp.moveaxis(fan_out_edges(x, g // s), 0, 3).reshape(n, h, w, g * c)
    y = lax.conv_general_dilated(
        xg, kernel.reshape(k, k, 1, g * c), (stride, stride), [(pad, pad)] * 2,
        rhs_dilation=(dilation, dilation), feature_group_count=g * c,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.moveaxis(y.reshape(n, y.shape[1], y.shape[2], g, c), 3, 0)
  y = _depthwise(x, _by_source(kernel, s), stride, dilation, impl)
  return y.reshape((g,) + y.shape[2:])


def _by_source(kernel, s: int):
  """A per-edge depthwise kernel [K,K,G,C] as [K,K,D,S,C] (edge g = d·S + s)."""
  k, _, g, c = kernel.shape
  return kernel.reshape(k, k, g // s, s, c)


def _depthwise(x, kernel, stride, dilation, impl, relu=False):
  """The 'shift' or 'native' depthwise conv of relu?(x): [S,N,H,W,C], [K,K,D,S,C] -> [D,S,N,H',W',C]."""
  if resolve_impl(impl) == 'native':
    return _depthwise_native(x, kernel, stride, dilation, relu)
  return _depthwise_shift(jnp.maximum(x, 0.0) if relu else x, kernel, stride, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_native(x, kernel, stride, dilation, relu):
  """``native.depthwise_forward`` with its backward call as the VJP (keeps x)."""
  return native.depthwise_forward(x, kernel, stride, dilation, relu)


def _depthwise_native_fwd(x, kernel, stride, dilation, relu):
  return _depthwise_native(x, kernel, stride, dilation, relu), (x, kernel)


def _depthwise_native_bwd(stride, dilation, relu, residuals, g):
  return native.depthwise_backward(*residuals, g, stride, dilation, relu)


_depthwise_native.defvjp(_depthwise_native_fwd, _depthwise_native_bwd)


def _depthwise_geometry(x, k, stride, dilation):
  pad = dilation * (k - 1) // 2
  out_h = _out_size(x.shape[-3], k, stride, dilation, pad)
  out_w = _out_size(x.shape[-2], k, stride, dilation, pad)
  return pad, out_h, out_w


def _transposed_views(g, k, stride, dilation, h, w):
  """The views of the output-side g [..., H', W', C] that the transpose of a
  'same'-padded KxK window op sums (tap (i, j) pairs with the flipped tap):
  g upsampled by the stride (interior zeros), padded, then read like a
  stride-1 forward op onto the input grid [..., H, W, C]."""
  pad, out_h, out_w = (dilation * (k - 1) // 2,) + g.shape[-3:-1]
  reach = (k - 1) * dilation
  g_full = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0),) * (g.ndim - 3) + (
      (reach - pad, h + pad - (out_h - 1) * stride - 1, stride - 1),
      (reach - pad, w + pad - (out_w - 1) * stride - 1, stride - 1), (0, 0, 0)))
  return _shifted_views(g_full, k, 1, dilation, h, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x, kernel, stride, dilation):
  """Σ over K² shifted views of x times the tap's weights.

  x: [S,N,H,W,C]; kernel: [K,K,D,S,C] -> [D,S,N,H',W',C]. The fan-out axis D
  broadcasts against the source, so the fanned-out input is never built.
  The custom VJP keeps only x and the kernel for the backward pass: plain
  autodiff would keep all K² shifted views (25x the input for a 5x5).
  """
  k = kernel.shape[0]
  pad, out_h, out_w = _depthwise_geometry(x, k, stride, dilation)
  taps = _kernel_taps(kernel)
  out = None
  for i, j, view in _shifted_views(_pad_hw(x, pad)[None], k, stride, dilation, out_h, out_w):
    term = view * taps[i * k + j]
    out = term if out is None else out + term
  return out


def _kernel_taps(kernel):
  """[K,K,D,S,C] -> the K² taps, row-major, each [D,S,1,1,1,C] to broadcast
  against [1,S,N,H,W,C] views (one split instead of K² index expressions)."""
  k, _, d, s, c = kernel.shape
  return lax.split(kernel.reshape(k * k * d, s, 1, 1, 1, c), (d,) * (k * k))


def _depthwise_shift_fwd(x, kernel, stride, dilation):
  return _depthwise_shift(x, kernel, stride, dilation), (x, kernel)


def _depthwise_shift_bwd(stride, dilation, residuals, g):
  x, kernel = residuals
  k, fan_out = kernel.shape[0], kernel.shape[2]
  h, w = x.shape[-3:-1]
  pad, out_h, out_w = _depthwise_geometry(x, k, stride, dilation)
  grad_kernel = _depthwise_kernel_grad(x, g, k, stride, dilation)
  # dx: the transposed conv, written as a forward shift-and-add over g
  # upsampled by the stride (interior zeros) and padded, with the flipped
  # kernel. Sums over small axes are unrolled: XLA:CPU fuses a chain of adds
  # into one loop but materialises a reduce over a short axis (10x slower).
  taps = _kernel_taps(kernel)
  acc = None
  for i, j, view in _transposed_views(g, k, stride, dilation, h, w):
    term = view * taps[(k - 1 - i) * k + (k - 1 - j)]
    acc = term if acc is None else acc + term
  grad_x = functools.reduce(jnp.add, [acc[d] for d in range(fan_out)])
  return grad_x, grad_kernel.reshape(kernel.shape)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)

# Bytes of x and g per slice of the kernel gradient's loop: one slice should
# stay in a core's L2 cache (2 MB on current x86 server cores).
_KERNEL_GRAD_SLICE_BYTES = 2 << 20


def _depthwise_kernel_grad(x, g, k, stride, dilation):
  """dK [K*K, D, S, C]: per tap, Σ over (N, H', W') of its view of x times g.

  Two loops. Over slices of a few images: one reduction per tap over the
  whole batch would read all of g K² times from memory; per slice the K²
  passes read from cache (2x faster for one 5x5 kernel gradient; the paper's
  search step 15.6 -> 12.6 s, 7.6 -> 6.0 GB of XLA temporaries). Over the
  taps (a loop, not unrolled): XLA:CPU compiles two kernels per unrolled tap,
  816 of a search cell's 1678; looped, two per kernel gradient. Same speed,
  a cell's compile ~40% shorter (docs/cpu_backend.md).
  """
  pad, out_h, out_w = _depthwise_geometry(x, k, stride, dilation)
  span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1

  def taps(xs, gs, acc):
    xp = _pad_hw(xs, pad)[None]  # [1,S,n,Hp,Wp,C] against gs [D,S,n,H',W',C]

    def tap(t, acc):
      view = lax.dynamic_slice_in_dim(xp, (t // k) * dilation, span_h, 3)
      view = lax.dynamic_slice_in_dim(view, (t % k) * dilation, span_w, 4)
      term = (view[:, :, :, ::stride, ::stride] * gs).sum((2, 3, 4))
      return lax.dynamic_update_index_in_dim(acc, lax.dynamic_index_in_dim(acc, t, 0, False) + term,
                                             t, 0)

    return lax.fori_loop(0, k * k, tap, acc)

  n = x.shape[1]
  per_image = (x.size + g.size) // n * g.dtype.itemsize
  size = max([d for d in range(1, n + 1) if n % d == 0 and d * per_image <= _KERNEL_GRAD_SLICE_BYTES],
             default=1)
  zeros = jnp.zeros((k * k,) + g.shape[:2] + g.shape[-1:], g.dtype)
  if size == n:
    return taps(x, g, zeros)
  return lax.fori_loop(0, n // size, lambda i, acc: taps(lax.dynamic_slice_in_dim(x, i * size, size, 1),
                                                         lax.dynamic_slice_in_dim(g, i * size, size, 2),
                                                         acc), zeros)


def pointwise_conv(x, kernel):
  """Per-edge 1x1 conv. x: [S,N,H,W,C]; kernel: [G,C,F], G = fan_out*S -> [G,N,H,W,F].

  A matmul batched over the sources; the fan_out edges leaving a source are
  more output columns of it. (Batched over the edges of a fanned-out copy of
  x instead, the input gradient was a dot per edge and a sum over them:
  XLA:CPU took 54 ms for the forward and backward pass of one
  [2,64,16,16,32] input to 4 edges of 16 channels, now 8.5 ms.)"""
  g, c, f = kernel.shape
  s = x.shape[0]
  if g == s:  # (the general form below made XLA transpose its operands here)
    y = jnp.einsum('gpc,gcf->gpf', x.reshape(g, -1, c), kernel)
  else:
    y = jnp.einsum('spc,dscf->dspf', x.reshape(s, -1, c), kernel.reshape(g // s, s, c, f))
  return y.reshape((g,) + x.shape[1:-1] + (f,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_shift(x, stride, hw):
  """Max over the 9 shifted views of x padded with -inf. x: [..., H, W, C].

  Custom VJP: keeps only which tap won each window (int8), and routes each
  gradient to the first maximal tap, as XLA's select-and-scatter does
  (autodiff of a max chain keeps every partial max).
  """
  del hw  # the input size, static, for the backward pass
  return _max_pool_argmax(x, stride)[0]


def _max_pool_argmax(x, stride):
  """The pooled maximum and the index (0..8, row-major) of its first maximal tap."""
  out_hw = (_out_size(x.shape[-3], 3, stride, 1, 1), _out_size(x.shape[-2], 3, stride, 1, 1))
  best = tap = None
  for t, (_, _, v) in enumerate(_shifted_views(_pad_hw(x, 1, -jnp.inf), 3, stride, 1, *out_hw)):
    if best is None:
      best, tap = v, jnp.zeros(v.shape, jnp.int8)
    else:  # strictly greater: ties stay with the earlier tap
      tap = jnp.where(v > best, jnp.int8(t), tap)
      best = jnp.maximum(best, v)
  return best, tap


def _max_pool_shift_fwd(x, stride, hw):
  del hw
  return _max_pool_argmax(x, stride)


def _max_pool_shift_bwd(stride, hw, tap, g):
  """dx[p] = Σ_t g[q] over the taps t whose window q won at p.

  Written on the input grid as one fused expression over shifted views of
  the winning-tap map and g, both upsampled by the stride: tap t = (i, j)
  of output q reads x[s·q + d_t], d_t = (i−1, j−1), so seen from input pixel
  p its output sits at p − d_t."""
  h, w = hw
  up = lambda a, fill: lax.pad(a, jnp.full((), fill, a.dtype), ((0, 0, 0),) * (a.ndim - 3) + (
      (1, h - stride * (a.shape[-3] - 1), stride - 1),
      (1, w - stride * (a.shape[-2] - 1), stride - 1), (0, 0, 0)))
  tap_up, g_up = up(tap, -1), up(g, 0)  # index p + 1 holds output q with s·q = p
  window = lambda a, di, dj: a[..., 1 - di:1 - di + h, 1 - dj:1 - dj + w, :]
  grad_x = None
  for t in range(9):
    di, dj = t // 3 - 1, t % 3 - 1
    term = jnp.where(window(tap_up, di, dj) == t, window(g_up, di, dj), 0.0)
    grad_x = term if grad_x is None else grad_x + term
  return (grad_x,)


_max_pool_shift.defvjp(_max_pool_shift_fwd, _max_pool_shift_bwd)


def max_pool_3x3(x, *, stride: int = 1, impl: str = 'auto'):
  """3x3 max pool, pad 1 with -inf. x: [..., H, W, C]."""
  if resolve_impl(impl) == 'lax':
    lead = (1,) * (x.ndim - 3)
    return lax.reduce_window(x, -jnp.inf, lax.max, lead + (3, 3, 1), lead + (stride, stride, 1),
                             ((0, 0),) * (x.ndim - 3) + ((1, 1), (1, 1), (0, 0)))
  return _max_pool_shift(x, stride, x.shape[-3:-1])


def avg_pool_3x3(x, *, stride: int = 1):
  """3x3 average pool, pad 1, padding excluded from the count (PyTorch
  count_include_pad=False). x: [..., H, W, C]. Linear, so one form serves
  every backend."""
  return _avg_pool(x, stride, x.shape[-3:-1])


def pool_3x3(x, kind: str, stride: int, impl: str = 'auto'):
  """``max_pool_3x3`` (kind 'max') or ``avg_pool_3x3`` (kind 'avg')."""
  if kind == 'max':
    return max_pool_3x3(x, stride=stride, impl=impl)
  return avg_pool_3x3(x, stride=stride)


def _avg_pool_count(h, w, stride, dtype):
  """How many in-bounds pixels each output window holds: [H', W', 1]."""
  ones = _pad_hw(jnp.ones((h, w, 1), dtype), 1)
  return sum(v for _, _, v in _shifted_views(ones, 3, stride, 1, _out_size(h, 3, stride, 1, 1),
                                             _out_size(w, 3, stride, 1, 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _avg_pool(x, stride, hw):
  """Custom VJP: autodiff would pad the cotangent once per tap (9 full-size
  copies); the transpose is itself one fused shift-and-add."""
  count = _avg_pool_count(*hw, stride, x.dtype)
  total = sum(v for _, _, v in _shifted_views(_pad_hw(x, 1), 3, stride, 1, *count.shape[:2]))
  return total / count


def _avg_pool_fwd(x, stride, hw):
  return _avg_pool(x, stride, hw), None  # linear: nothing to keep


def _avg_pool_bwd(stride, hw, _, g):
  h, w = hw
  g = g / _avg_pool_count(h, w, stride, g.dtype)
  return (sum(v for _, _, v in _transposed_views(g, 3, stride, 1, h, w)),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def materialize(x, after=None):
  """x, computed once into its own buffer, on XLA:CPU (elsewhere x itself);
  not before ``after`` (an array) is computed, if given.

  XLA:CPU fuses cheap elementwise producers into every consumer, so a
  gradient summed from many edges' backward passes was recomputed by each of
  its consumers (one 32x32 search cell: 4.1 s per step, 2.8 s with this). An
  optimization barrier does not help (XLA:CPU removes barriers before fusion);
  a dot is never fused, and one with the identity at full precision is exact
  for finite x and costs one pass over it.
  """
  if jax.default_backend() != 'cpu':
    return x
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  if after is not None:
    eye = _after(eye, after)
  return jnp.einsum('...c,cd->...d', x, eye, precision=lax.Precision.HIGHEST)


@jax.custom_vjp
def materialize_grad(x):
  """Identity whose cotangent is ``materialize``d (see there)."""
  return x


materialize_grad.defvjp(lambda x: (x, None), lambda _, g: (materialize(g),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def mix_edges(terms, weights, keep, fan_out: int):
  """The inputs that a batch of G = fan_out·S edges sends to its fan_out
  destination nodes: a tuple of fan_out arrays [N,H,W,C],

    out[d] = Σ_s Σ_k weights[g, k] · keep[g] · terms[k][g],   g = d·S + s.

  ``terms[k]`` is either [G,N,H,W,C] (each edge's own op output) or
  [S,N,H,W,C] (one output that the fan_out edges leaving a source share:
  identity, pools with non-affine BN), read per source instead of copied.
  A term may also be a triple (h, mean, var) [G,N,H,W,C], [G,C], [G,C]: a
  DilConv's output before its BN (``DilConv(raw=True)``), normalised here
  as (h − mean)·rsqrt(var + ε); its backward pass is one native call
  (``native.mix_grad_raw``) that yields BN's reductions too, and XLA never
  writes the normalised copy (README, "Performance").
  ``keep`` [G, N or 1] scales whole edges per image (drop-path).
  Summing into the destinations here, with a custom VJP that keeps only the
  terms and small weights, avoids what autodiff of the plain sum builds:
  every weight broadcast to an activation-sized array, and a zero-padded
  copy of the batch per edge picked out of it.
  """
  n_src = weights.shape[0] // fan_out
  scale = weights[:, :, None] * keep[:, None, :]  # [G, K, N or 1]
  outs = []
  for d in range(fan_out):
    acc = None
    for s in range(n_src):
      g = d * n_src + s
      for k, t in enumerate(terms):
        term = _term_at(t, s if _lead(t) != weights.shape[0] else g) * scale[g, k].reshape(-1, 1, 1, 1)
        acc = term if acc is None else acc + term
    outs.append(acc)
  return tuple(outs)


def _lead(term):
  """The leading (edge or source) size of a term or raw triple."""
  return (term[0] if isinstance(term, tuple) else term).shape[0]


def _term_at(term, i):
  """Edge (or source) i of a term; a raw triple normalised."""
  if not isinstance(term, tuple):
    return term[i]
  h, mean, var = term
  return (h[i] - mean[i]) * lax.rsqrt(var[i] + BN_EPSILON)


def _mix_fwd(terms, weights, keep, fan_out):
  return mix_edges(terms, weights, keep, fan_out), (terms, weights, keep)


def _mix_bwd(fan_out, residuals, cotangents):
  terms, weights, keep = residuals
  n_edges = weights.shape[0]
  cotangents = tuple(materialize(g) for g in cotangents)
  g = jnp.stack(cotangents)[:, None]  # [D, 1, N, H, W, C]
  keep6 = keep.reshape(fan_out, -1, keep.shape[1], 1, 1, 1)  # [D, S, N or 1, 1, 1, 1]
  g_keep = g * keep6  # [D, S, N, H, W, C]
  grad_terms, grad_weights = [], []
  for k, t in enumerate(terms):
    if isinstance(t, tuple):  # raw (h, mean, var): BN's backward reductions too
      h, mean, var = t
      w, rstd = weights[:, k], lax.rsqrt(var + BN_EPSILON)
      dh, q, r = native.mix_grad_raw(g[:, 0], jnp.broadcast_to(keep, h.shape[:2]), h, mean, rstd, w)
      grad_terms.append((dh, -rstd * w[:, None] * r, -0.5 * rstd ** 3 * w[:, None] * q))
      grad_weights.append((rstd * q).sum(-1))
      continue
    scale = g_keep * weights[:, k].reshape(fan_out, -1, 1, 1, 1, 1)
    if t.shape[0] != n_edges:  # shared: sum over the destinations, unrolled
      grad_terms.append(functools.reduce(jnp.add, [scale[d] for d in range(fan_out)]))
      t_ds = t[None]
    else:
      grad_terms.append(scale.reshape(t.shape))
      t_ds = t.reshape(g_keep.shape[:2] + t.shape[1:])
    grad_weights.append((g_keep * t_ds).sum((2, 3, 4, 5)).reshape(-1))
  return tuple(grad_terms), jnp.stack(grad_weights, axis=1), jnp.zeros_like(keep)


mix_edges.defvjp(_mix_fwd, _mix_bwd)


# ----------------------------------------------------------------------------
# Modules. Each maps [S,N,H,W,C_in] -> [fan_out*S,N,H',W',C_out].
# ----------------------------------------------------------------------------

def _moments(x):
  """Per-(edge, channel) batch mean and biased variance over (N, H, W), as
  torch.nn.BatchNorm2d in training (E[x²] − E[x]²). x: [G,N,H,W,C] -> 2 x [G,C]."""
  axes = tuple(range(1, x.ndim - 1))
  mean = x.mean(axes)
  return mean, jnp.maximum(jnp.square(x).mean(axes) - jnp.square(mean), 0.0)


def _per_statistic(x) -> int:
  """Values behind each (edge, channel) statistic of x [G,N,H,W,C]: N·H·W."""
  return x[0].size // x.shape[-1]


def _normalize(x, mean, var, scale, bias):
  """(x − mean) / sqrt(var + ε) · scale + bias; statistics [G,C], scale and bias [G,C] or None."""
  mul = lax.rsqrt(var + BN_EPSILON)
  if scale is not None:
    mul = mul * scale
  y = (x - _per_edge(mean, x.ndim)) * _per_edge(mul, x.ndim)
  return y if bias is None else y + _per_edge(bias, x.ndim)


class EdgeBatchNorm(nn.Module):
  """BatchNorm with one channel per (edge, channel): x [G,N,H,W,C].

  Statistics over (N, H, W) as torch.nn.BatchNorm2d / flax BatchNorm (biased
  batch variance, E[x²] − E[x]²); running averages with momentum 0.1 in
  PyTorch's convention.

  Its variables are the reference BatchNorm's (``snas_jax.layers.BatchNorm``),
  at its path and in its layout: [edges, C] as in a search edge batch, or
  [C] for one edge (``edge_axis`` False: a child op, a cell's preprocessing).
  ``sources``: it normalises one tensor per source, shared by the
  edges // sources edges leaving it (a pool without affine parameters: each
  of those edges' BNs is the same function of the same tensor); it keeps the
  reference's per-edge statistics, each source's in every edge leaving it.

  ``pooled=(kind, stride, impl)``: normalise ``pool_3x3(x)`` instead — in
  training without affine parameters on impl 'native', one C++ call with its
  own VJP (``pool_bn``); the BN keeps its variables and their place either way.
  """
  edges: int
  c: int
  affine: bool = True
  edge_axis: bool = True
  sources: int | None = None

  def setup(self):
    shape = (self.edges, self.c) if self.edge_axis else (self.c,)
    self.running_mean = self.variable('batch_stats', 'mean', jnp.zeros, shape, jnp.float32)
    self.running_var = self.variable('batch_stats', 'var', jnp.ones, shape, jnp.float32)
    if self.affine:
      self.scale = self.param('scale', nn.initializers.ones, shape)
      self.bias = self.param('bias', nn.initializers.zeros, shape)

  def __call__(self, x, train: bool, pooled: tuple | None = None):
    if pooled is None:
      return _batch_norm(x, train, *self.parts(train))
    kind, stride, impl = pooled
    scale, bias, statistics = self.parts(train)
    if train and not self.affine and resolve_impl(impl) == 'native':
      y, mean, var = pool_bn(x, kind, stride)
      statistics(mean, var, _per_statistic(y))
      return y
    return _batch_norm(pool_3x3(x, kind, stride, impl), train, scale, bias, statistics)

  def parts(self, train: bool):
    """(scale, bias) as [G,C] (None without affine) and ``statistics``: () ->
    running (mean, var) as [G,C]; (mean, var, count) -> update them with a
    batch's (not while initialising). G: the edges, or the sources if shared."""
    scale = bias = None
    if self.affine:
      scale, bias = self.scale.reshape(self.edges, self.c), self.bias.reshape(self.edges, self.c)
    copies = self.edges // self.sources if self.sources else 1

    def statistics(*batch):
      if not batch:
        running = (v.value.reshape(self.edges, self.c)
                   for v in (self.running_mean, self.running_var))
        # A shared BN's copies are equal: the first destination's.
        return tuple(v[:self.sources] if copies > 1 else v for v in running)
      mean, var, count = batch
      if train and not self.is_initializing():
        # The running variance takes the unbiased batch variance, as PyTorch's.
        for v, batch_value in ((self.running_mean, mean),
                               (self.running_var, var * (count / max(count - 1, 1)))):
          if copies > 1:
            batch_value = jnp.tile(batch_value, (copies, 1))
          v.value = BN_MOMENTUM * v.value + (1 - BN_MOMENTUM) * batch_value.reshape(v.value.shape)

    return scale, bias, statistics


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def pool_bn(x, kind: str, stride: int):
  """Training-mode 3x3 pool -> BN without affine parameters, native: (the
  normalised pool ŷ, batch mean, batch variance). x [S,N,H,W,C].

  Keeps x and ŷ (which the cell's mixer keeps anyway); the backward pass is
  one BN reduction call and one call that recomputes each window's winner."""
  return _pool_bn_fwd(x, kind, stride)[0]


def _pool_bn_fwd(x, kind, stride):
  y, mean, var = native.pool_forward(x, stride, kind)
  yhat = _normalize(y, mean, var, None, None)
  return (yhat, mean, var), (x, yhat, var)


def _pool_bn_bwd(kind, stride, residuals, cotangents):
  """BN's backward with h − mean = ŷ / rstd: the gradient reaching the pool is
  dh = rstd·dŷ + B·ŷ + C0, B = −rstd·mean(dŷ·ŷ) + 2·dvar/(m·rstd),
  C0 = −rstd·mean(dŷ) + dmean/m (m values per statistic)."""
  x, yhat, var = residuals
  dy, dmean, dvar = cotangents
  m = yhat[0].size // yhat.shape[-1]
  sum_dy, sum_dy_yhat = native.bn_grad_sums(yhat, dy, jnp.zeros_like(var))
  rstd = lax.rsqrt(var + BN_EPSILON)
  coef = jnp.stack([rstd, -rstd * sum_dy_yhat / m + 2.0 * dvar / (m * rstd),
                    -rstd * sum_dy / m + dmean / m])
  return (native.pool_backward(x, yhat, dy, coef, stride, kind),)


pool_bn.defvjp(_pool_bn_fwd, _pool_bn_bwd)


def _batch_norm(x, train: bool, scale, bias, statistics):
  """Training: normalise with x's batch statistics and update the running
  ones; evaluation: normalise with the running ones (``EdgeBatchNorm.parts``)."""
  mean, var = _moments(x) if train else statistics()
  if train:
    statistics(mean, var, _per_statistic(x))
  return _normalize(x, mean, var, scale, bias)


def _native_raw(module: nn.Module, train: bool) -> bool:
  """Whether a DilConv or SepConv can hand over its output before BN
  (``dilconv_raw``): training on 'native', no affine parameters, no remat."""
  return (train and not module.affine and not module.remat
          and resolve_impl(module.impl) == 'native')


class ConvKernel(nn.Module):
  """A reference conv's kernel (``nn.Conv``'s 'kernel' at this module's path,
  in its layout: ``shape``, with a leading edge axis in a search edge batch),
  for an op that runs the conv itself. PyTorch's init, U(±1/sqrt(fan_in))."""
  shape: tuple
  fan_in: int

  @nn.compact
  def __call__(self):
    return self.param('kernel', torch_uniform_init(self.fan_in), self.shape)


def _edges_shape(shape: tuple, edges: int, edge_axis: bool) -> tuple:
  """A reference variable's shape: with the edge axis of an edge batch, or of one edge."""
  return ((edges,) if edge_axis else ()) + shape


class PointwiseConv(nn.Module):
  """Per-edge 1x1 conv: x [S,N,H,W,C] -> [fan_out·S,N,H,W,features]; its kernel
  the reference's [(G,) 1, 1, C, F]."""
  features: int
  fan_out: int = 1
  edge_axis: bool = True

  @nn.compact
  def __call__(self, x):
    s, c = x.shape[0], x.shape[-1]
    g = self.fan_out * s
    kernel = self.param('kernel', torch_uniform_init(c),
                        _edges_shape((1, 1, c, self.features), g, self.edge_axis))
    return pointwise_conv(x, kernel.reshape(g, c, self.features))


class DilConv(nn.Module):
  """ReLU -> depthwise KxK (dilation, stride) -> 1x1 -> BN.

  Its variables are the reference DilConv's ('depthwise', 'pointwise' and
  'bn', with a leading edge axis in a search edge batch: ``edge_axis``), taken
  as arrays (``ConvKernel``, ``EdgeBatchNorm.parts``) because in training on
  XLA:CPU ('shift', 'native') the four steps are one function with a
  hand-written VJP, ``relu_conv_bn``, on a [K,K,G,C] depthwise kernel and a
  [G,C,F] 1x1 kernel. ``remat``: that VJP
  keeps less and recomputes more (less memory, slower); the 'lax' path
  (GPU/TPU) ignores it (the networks remat whole cells there).

  ``raw=True``: in training on 'native' without affine parameters or remat
  (``_native_raw``), return (h, batch mean, batch variance) — the output
  before BN's normalisation — for a consumer that normalises it itself
  (``mix_edges``, the next DilConv); otherwise the normalised output as
  usual. ``x`` may be such a triple (then it always runs ``dilconv_raw``).
  """
  c_out: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  fan_out: int = 1
  affine: bool = True
  impl: str = 'auto'
  remat: bool = False
  edge_axis: bool = True

  @nn.compact
  def __call__(self, x, train: bool, raw: bool = False):
    x_in = x[0] if isinstance(x, tuple) else x
    s, c, k = x_in.shape[0], x_in.shape[-1], self.kernel_size
    g = self.fan_out * s
    shape = lambda *dims: _edges_shape(dims, g, self.edge_axis)
    # The reference's [(G,) K, K, 1, C] as [K, K, G, C]; [(G,) 1, 1, C, F] as [G, C, F].
    dw = ConvKernel(shape(k, k, 1, c), k * k, name='depthwise')()
    dw = jnp.moveaxis(dw.reshape(g, k, k, c), 0, 2)
    pw = ConvKernel(shape(1, 1, c, self.c_out), c, name='pointwise')().reshape(g, c, self.c_out)
    scale, bias, statistics = EdgeBatchNorm(g, self.c_out, self.affine, self.edge_axis,
                                            name='bn').parts(train)
    if isinstance(x, tuple) or (raw and _native_raw(self, train)):
      h, mean, var = dilconv_raw(x, dw, pw, self.stride, self.dilation)
      statistics(mean, var, _per_statistic(h))
      return (h, mean, var) if raw else _normalize(h, mean, var, scale, bias)
    if train and resolve_impl(self.impl) in ('shift', 'native'):
      y, mean, var = relu_conv_bn(x, dw, pw, scale, bias, self.stride, self.dilation, self.remat,
                                  resolve_impl(self.impl))
      statistics(mean, var, _per_statistic(y))
      return y
    h = pointwise_conv(depthwise_conv(nn.relu(x), dw, stride=self.stride,
                                      dilation=self.dilation, impl=self.impl), pw)
    return _batch_norm(h, train, scale, bias, statistics)


def _relu_conv(x, dw, pw, stride, dilation, impl):
  """ReLU -> depthwise (shift or native) -> 1x1: ([G,N,H',W',C] after the depthwise, [G,N,H',W',F])."""
  a = _depthwise(x, _by_source(dw, x.shape[0]), stride, dilation, impl, relu=True)
  a = a.reshape((dw.shape[2],) + a.shape[2:])
  return a, pointwise_conv(a, pw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def relu_conv_bn(x, dw, pw, scale, bias, stride, dilation, remat=False, impl='shift'):
  """Training-mode DilConv for XLA:CPU: (y, batch mean, batch variance).

  x: [S,N,H,W,C]; dw: [K,K,G,C]; pw: [G,C,F]; scale, bias: [G,F] or None.

  impl 'native': the C++ calls of ``snas_jax.native`` (one forward, two
  backward; the depthwise output is recomputed per image in the cache, never
  stored). It keeps x and the 1x1 conv's output h (``remat``: recomputes h
  in the backward pass too). impl 'shift', the XLA form below:

  Why a hand-written VJP: autodiff keeps both [G,N,H',W',·] intermediates of
  every edge (after the depthwise and after the 1x1 conv) until the backward
  pass, and XLA:CPU's scheduler runs the small weight-gradient reductions
  late, keeping their large operands alive longer still. This VJP keeps x,
  the depthwise output (or, with ``remat``, recomputes it from x too) and
  the BN statistics, recomputes the 1x1 conv (a cheap dot), and makes the
  rest of the backward pass wait for the weight gradients. Paper search
  step, back-to-back runs: 12.4 -> 10.5 s, XLA temporaries 6.0 -> 3.7 GB
  (remat: 14.3 s, 2.4 GB); docs/cpu_backend.md.

  A recomputation must not read the same operands as the forward pass:
  XLA's common-subexpression elimination would merge the two and the kept
  intermediate would come back. So it reads a weight (or x, materialised)
  with a zero added that depends on the cotangent, which also keeps XLA from
  running it before the backward pass needs it.
  """
  return _relu_conv_bn_fwd(x, dw, pw, scale, bias, stride, dilation, remat, impl)[0]


def _relu_conv_bn_fwd(x, dw, pw, scale, bias, stride, dilation, remat, impl):
  if impl == 'native':  # one call; the depthwise output is never stored
    h, mean, var = _dilconv_native(x, dw, pw, stride, dilation)
    y = _normalize(h, mean, var, scale, bias)
    return (y, mean, var), (x, dw, pw, scale, mean, var, None if remat else h)
  a, h = _relu_conv(x, dw, pw, stride, dilation, impl)
  mean, var = _moments(h)
  y = _normalize(h, mean, var, scale, bias)
  return (y, mean, var), (x, dw, pw, scale, mean, var, None if remat else a)


def _after(v, dy):
  """v plus a zero that XLA must compute from dy (it does not fold 0·x for floats).

  The zero is 0·dy[0]: NaN if that entry is not finite, which only happens
  when the gradients are not finite anyway (the scripts stop on a NaN loss)."""
  return v + 0.0 * dy.reshape(-1)[0].astype(v.dtype)


def _relu_conv_bn_bwd(stride, dilation, remat, impl, residuals, cotangents):
  x, dw, pw, scale, mean, var, a = residuals
  dy, dmean, dvar = cotangents
  k, _, g, c = dw.shape
  s, f = x.shape[0], pw.shape[-1]
  if impl == 'native':
    if remat:  # h again, from a weight tied to dy: neither merged with the forward call nor early
      a = _dilconv_native(x, dw, _after(pw, dy), stride, dilation)[0]
    return _dilconv_native_bwd(stride, dilation, x, dw, pw, scale, mean, var, a, dy, dmean, dvar)
  if remat:
    a, h = _relu_conv(materialize(x, after=dy), dw, pw, stride, dilation, impl)
  else:
    h = pointwise_conv(a, _after(pw, dy))
  m = h[0].size // f  # values per statistic: N·H'·W'
  axes = tuple(range(1, h.ndim - 1))
  e = lambda v: _per_edge(v, h.ndim)
  rstd = lax.rsqrt(var + BN_EPSILON)
  centred = h - e(mean)
  d_norm = dy if scale is None else dy * e(scale)  # d loss / d normalised h
  # BN's backward: d h = rstd·(d_norm − mean(d_norm) − x̂·mean(d_norm·x̂)), plus
  # the direct cotangents of the returned statistics (zero for the usual loss).
  mean_d = d_norm.mean(axes)
  mean_dx = (d_norm * centred).mean(axes) * rstd
  dh = (e(rstd) * (d_norm - e(mean_d) - centred * e(rstd * mean_dx))
        + e(dmean / m) + centred * e(2.0 * dvar / m))
  d_scale = d_bias = None
  if scale is not None:
    d_scale = (dy * centred).sum(axes) * rstd
    d_bias = dy.sum(axes)
  dh = dh.reshape(g, -1, f)
  d_pw = jnp.einsum('gpc,gpf->gcf', a.reshape(g, -1, c), dh)
  # The rest waits for the weight gradients (see the docstring).
  da = jnp.einsum('gpf,gcf->gpc', dh, _after(pw, d_pw)).reshape(a.shape)
  kernel, da = _by_source(dw, s), da.reshape((g // s, s) + a.shape[1:])
  if impl == 'native':  # one call: both gradients, dx already masked by the ReLU
    dx, d_dw = native.depthwise_backward(x, kernel, da, stride, dilation, relu=True)
  else:
    dr, d_dw = _depthwise_shift_bwd(stride, dilation, (jnp.maximum(x, 0.0), kernel), da)
    dx = _after(jnp.where(x > 0, dr, 0.0), d_dw)
  return dx, d_dw.reshape(dw.shape), d_pw, d_scale, d_bias


def _dilconv_native(x, dw, pw, stride, dilation):
  """(h, mean, var) of the native DilConv; dw [K,K,G,C] as the module passes it;
  x an array or a raw triple (``dilconv_raw``)."""
  x, norm = _raw_input(x)
  return native.dilconv_forward(x, _by_source(dw, x.shape[0]), pw, stride, dilation, norm)


def _dilconv_native_bwd(stride, dilation, x, dw, pw, scale, mean, var, h, dy, dmean, dvar):
  """The native VJP: BN's two reductions in one call, then everything else in
  one more, from the gradient reaching h written as A·dy + B·(h − mean) + C0
  (the same algebra as the XLA form below, with d_norm = scale·dy)."""
  m = h[0].size // h.shape[-1]  # values per statistic: N·H'·W'
  sum_dy, sum_dy_centred = native.bn_grad_sums(h, dy, mean)
  rstd = lax.rsqrt(var + BN_EPSILON)
  gain = rstd if scale is None else rstd * scale
  b = 2.0 * dvar / m - gain * jnp.square(rstd) * sum_dy_centred / m
  c0 = dmean / m - gain * sum_dy / m
  coef = jnp.stack([jnp.broadcast_to(gain, b.shape), b, c0, mean])
  dx, d_dw, d_pw = native.dilconv_backward(x, _by_source(dw, x.shape[0]), pw,
                                           h, dy, coef, stride, dilation)
  d_scale = d_bias = None
  if scale is not None:
    d_scale, d_bias = sum_dy_centred * rstd, sum_dy
  return dx, d_dw.reshape(dw.shape), d_pw, d_scale, d_bias


relu_conv_bn.defvjp(_relu_conv_bn_fwd, _relu_conv_bn_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def dilconv_raw(x, dw, pw, stride, dilation):
  """Training-mode native DilConv without its BN's normalisation: (h [G,N,H',W',F],
  batch mean, batch variance [G,F]) for a consumer that normalises h itself.
  Its VJP takes the cotangents of all three, so BN's backward reductions are
  the consumer's (``mix_edges``, or the next DilConv: one pass that it
  makes anyway). x [S,N,H,W,C], or such a triple (h, mean, var) of the
  DilConv before (a SepConv's second half): normalised on its way into the
  ReLU inside the native calls, so XLA never writes the normalised copy."""
  return _dilconv_native(x, dw, pw, stride, dilation)


def _raw_input(x):
  """(array, normalisation [2,S,C] = (mean, rstd) or None) of a DilConv input."""
  if not isinstance(x, tuple):
    return x, None
  h, mean, var = x
  return h, jnp.stack([mean, lax.rsqrt(var + BN_EPSILON)])


def _dilconv_raw_fwd(x, dw, pw, stride, dilation):
  h, mean, var = _dilconv_native(x, dw, pw, stride, dilation)
  return (h, mean, var), (x, dw, pw, h, mean)


def _dilconv_raw_bwd(stride, dilation, residuals, cotangents):
  """d h total = dh + dmean/m + 2·(h − mean)·dvar/m: the native backward's
  A·dy + B·(h − mean) + C0 with A = 1 (m values per statistic). A raw input
  (h', mean', var') gets the cotangents of x1 = (h' − mean')·rstd' from the
  gradient t reaching x1 and its sums: rstd'·t, −rstd'·Σt, −rstd'²·Σt·x1 / 2."""
  x, dw, pw, h, mean = residuals
  dh, dmean, dvar = cotangents
  m = h[0].size // h.shape[-1]
  coef = jnp.stack([jnp.ones_like(mean), 2.0 * dvar / m, dmean / m, mean])
  xa, norm = _raw_input(x)
  out = native.dilconv_backward(xa, _by_source(dw, xa.shape[0]), pw, h, dh, coef, stride,
                                dilation, norm)
  dx, d_dw, d_pw = out[:3]
  if norm is not None:
    rstd, sums = norm[1], out[3]
    dx = (dx, -rstd * sums[0], -0.5 * jnp.square(rstd) * sums[1])
  return dx, d_dw.reshape(dw.shape), d_pw


dilconv_raw.defvjp(_dilconv_raw_fwd, _dilconv_raw_bwd)


class SepConv(nn.Module):
  """DilConv(stride) then DilConv(stride 1), both with dilation 1."""
  c_out: int
  kernel_size: int
  stride: int = 1
  fan_out: int = 1
  affine: bool = True
  impl: str = 'auto'
  remat: bool = False
  edge_axis: bool = True

  @nn.compact
  def __call__(self, x, train: bool, raw: bool = False):
    """``raw``: the second DilConv's (see DilConv). Where the first can hand
    its output over before BN (``_native_raw``), it does: the second
    normalises it inside its native calls."""
    c_in = x.shape[-1]
    x = DilConv(c_in, self.kernel_size, self.stride, 1, self.fan_out, self.affine,
                self.impl, self.remat, self.edge_axis, name='dil_0')(
                    x, train, raw=_native_raw(self, train))
    return DilConv(self.c_out, self.kernel_size, 1, 1, 1, self.affine, self.impl,
                   self.remat, self.edge_axis, name='dil_1')(x, train, raw=raw)


class Pool(nn.Module):
  """3x3 max or average pool -> BN (the reference's search cells add the BN).

  ``share``: without affine parameters, return one output per source
  [S,N,H',W',C] that its fan_out edges share, for ``mix_edges``."""
  kind: str  # 'max' | 'avg'
  stride: int = 1
  fan_out: int = 1
  affine: bool = True
  impl: str = 'auto'
  edge_axis: bool = True
  share: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    s, c = x.shape[0], x.shape[-1]
    g = self.fan_out * s
    if self.affine:
      y = pool_3x3(x, self.kind, self.stride, self.impl)
      return EdgeBatchNorm(g, c, True, self.edge_axis, name='bn')(
          fan_out_edges(y, self.fan_out), train)
    # Without affine parameters the BN of every edge leaving one source is the
    # same function of the same tensor: normalise once per source.
    y = EdgeBatchNorm(g, c, False, self.edge_axis, sources=s, name='bn')(
        x, train, pooled=(self.kind, self.stride, self.impl))
    return y if self.share else fan_out_edges(y, self.fan_out)


class FactorizedReduce(nn.Module):
  """ReLU -> concat(1x1/2 conv of x, 1x1/2 conv of x shifted by a pixel) -> BN."""
  c_out: int
  fan_out: int = 1
  affine: bool = True
  edge_axis: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    if self.c_out % 2:
      raise ValueError(f'FactorizedReduce needs an even channel count, got {self.c_out}')
    x = nn.relu(x)
    half = self.c_out // 2
    a = PointwiseConv(half, self.fan_out, self.edge_axis, name='conv_1')(x[:, :, ::2, ::2])
    b = PointwiseConv(half, self.fan_out, self.edge_axis, name='conv_2')(x[:, :, 1::2, 1::2])
    return EdgeBatchNorm(self.fan_out * x.shape[0], self.c_out, self.affine, self.edge_axis,
                         name='bn')(jnp.concatenate([a, b], axis=-1), train)


class ReLUConvBN(nn.Module):
  """ReLU -> 1x1 conv -> BN (cell preprocessing: one edge, x [1,N,H,W,C])."""
  c_out: int
  affine: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    y = PointwiseConv(self.c_out, edge_axis=False, name='conv')(nn.relu(x))
    return EdgeBatchNorm(1, self.c_out, self.affine, edge_axis=False, name='bn')(y, train)


class Identity(nn.Module):
  fan_out: int = 1
  share: bool = False  # return x itself, which its fan_out edges share (``mix_edges``)

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return x if self.share else fan_out_edges(x, self.fan_out)


def make_op(name: str, c: int, stride: int, *, fan_out: int = 1, affine: bool = True,
            impl: str = 'auto', remat: bool = False, edge_axis: bool = True,
            share: bool = False, op_name: str | None = None) -> nn.Module | None:
  """The module for PRIMITIVES ``name`` (None for 'none': it is never computed).
  ``remat``: the convolutions recompute more in the backward pass (DilConv).
  ``edge_axis``: its variables carry the leading edge axis of the reference's
  search edge batch; False: one edge's (a child op; fan_out = S = 1). ``share``: an op whose output
  is the same for every edge leaving a source (identity; a pool without
  affine parameters) returns it once per source."""
  kw = dict(name=op_name)
  if name == 'none':
    return None
  if name in ('max_pool_3x3', 'avg_pool_3x3'):
    return Pool(name[:3], stride, fan_out, affine, impl, edge_axis, share, **kw)
  if name == 'skip_connect':
    return (Identity(fan_out, share, **kw) if stride == 1
            else FactorizedReduce(c, fan_out, affine, edge_axis, **kw))
  if name in ('sep_conv_3x3', 'sep_conv_5x5'):
    return SepConv(c, int(name[-1]), stride, fan_out, affine, impl, remat, edge_axis, **kw)
  if name in ('dil_conv_3x3', 'dil_conv_5x5'):
    return DilConv(c, int(name[-1]), stride, 2, fan_out, affine, impl, remat, edge_axis, **kw)
  raise ValueError(f'unknown op {name!r}; choose one of {", ".join(PRIMITIVES)}')
