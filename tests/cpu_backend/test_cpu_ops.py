"""Tests for snas_jax.backends.cpu.ops (the CPU backend's edge-batched ops): fast ('shift', and 'native': the C++ custom calls)
vs plain ('lax') kernels, pools, FactorizedReduce, parameter counts (docs/algorithm.md §4
sizes) and edge batching.

Tolerances: 'shift', 'native' and 'lax' compute the same sums of products in a
different order, so in float32 they agree to a few ulps of the largest term;
we allow 1e-5 relative to the largest magnitude of each compared array
(O(25) products of O(1) numbers: a few 1e-7 expected, measured ≤ 2.5e-7).
"""
import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from snas_jax.backends.cpu import native, ops
from snas_jax.spaces.darts.genotypes import PRIMITIVES

# The CPU backend runs on the CPU: skipped where JAX runs on another platform.
pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu',
                                reason='the CPU backend runs on the CPU only')


def _assert_close(a, b, rel=1e-5):
  """Leaf by leaf, in numpy: |a − b| ≤ rel·|b| + rel·max|b|."""
  def check(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape, (x.shape, y.shape)
    scale = max(float(np.max(np.abs(y))), 1e-6)
    np.testing.assert_allclose(x, y, rtol=rel, atol=rel * scale)
  jax.tree_util.tree_map(check, a, b)


# ----------------------------------------------------------------------------
# depthwise_conv: shift == lax, values and gradients.

# The 8 (kernel, dilation, stride) geometries of the real ops (sep3/5:
# dilation 1, dil3/5: dilation 2; stride 1 and 2), each with one of the 4
# edge layouts (fan_out, S) in {1, 3} x {1, 2}, every layout twice. Geometry
# (padding, strided slicing, the transposed conv in dx) and edge layout (the
# broadcast over D, the sum over D in dx) are separate code paths, so this
# covers both without the full 32-way product (each config costs a compile).
_LAYOUTS = [(1, 1), (3, 2), (1, 2), (3, 1)]
DW_CONFIGS = [(k, d, s) + _LAYOUTS[(i + (k == 5)) % 4]
              for i, (k, d, s) in enumerate(itertools.product([3, 5], [1, 2], [1, 2]))]


@functools.partial(jax.jit, static_argnames=('stride', 'dilation'))
def _dw_fwd_bwd(x, kernel, cotangent, stride, dilation):
  """(y, dx, dkernel) for 'lax', 'shift' and 'native': one compile for all."""
  def one(impl):
    y, vjp = jax.vjp(lambda x, k: ops.depthwise_conv(
        x, k, stride=stride, dilation=dilation, impl=impl), x, kernel)
    return (y,) + vjp(cotangent)
  return one('lax'), one('shift'), one('native')


@pytest.mark.parametrize('k,dilation,stride,fan_out,s', DW_CONFIGS)
def test_depthwise_shift_and_native_equal_lax(k, dilation, stride, fan_out, s):
  rng = np.random.default_rng(k * 100 + dilation * 10 + stride)
  x = rng.normal(size=(s, 2, 8, 7, 3)).astype(np.float32)  # non-square: catches an H/W swap
  kernel = rng.normal(size=(k, k, fan_out * s, 3)).astype(np.float32)
  pad = dilation * (k - 1) // 2
  out_h, out_w = ((size + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for size in (8, 7))
  cotangent = rng.normal(size=(fan_out * s, 2, out_h, out_w, 3)).astype(np.float32)
  plain, *fast = _dw_fwd_bwd(x, kernel, cotangent, stride, dilation)
  y_lax = plain[0]
  chex.assert_shape(y_lax, (fan_out * s, 2, out_h, out_w, 3))
  assert out_h == (8 if stride == 1 else 4) and out_w == (7 if stride == 1 else 4)  # 'same'
  for outputs in fast:
    for a, b in zip(outputs, plain):
      chex.assert_equal_shape([a, b])
      _assert_close(a, b)
  y_sh = fast[0][0]
  # Edge g = d*S + src reads source src with kernel [..., g, :]: every edge
  # against a plain depthwise convolution of its own source.
  for g in range(fan_out * s):
    single = lax.conv_general_dilated(
        x[g % s], kernel[:, :, g, None, :], (stride, stride), [(pad, pad)] * 2,
        rhs_dilation=(dilation, dilation), feature_group_count=3,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    _assert_close(y_sh[g], single)


@pytest.mark.parametrize('k,dilation,stride', [(3, 1, 1), (5, 2, 2)])
def test_native_depthwise_wide_channels_with_relu(k, dilation, stride):
  """The C++ kernels' full 16-channel blocks and their tail (C = 37 = 2·16 + 5),
  the generic loops (C not 8/16/32/64; W = 11), NaN and
  negative inputs through the fused ReLU (dx zero where ReLU clipped x, NaN
  in stays NaN out, as jnp.maximum) and a batch split over many threads'
  chunks (N = 10): forward and both gradients against lax."""
  rng = np.random.default_rng(11)
  s, fan_out, c = 2, 2, 37
  x = rng.normal(size=(s, 10, 9, 11, c)).astype(np.float32)
  kernel = rng.normal(size=(k, k, fan_out, s, c)).astype(np.float32)
  y = jax.jit(lambda x, kern: native.depthwise_forward(x, kern, stride, dilation, True))(x, kernel)
  cotangent = rng.normal(size=y.shape).astype(np.float32)

  def plain(x, kern):
    return ops.depthwise_conv(jax.nn.relu(x), kern.reshape(k, k, fan_out * s, c), stride=stride,
                              dilation=dilation, impl='lax').reshape(y.shape)
  want, vjp = jax.vjp(plain, x, kernel)
  dx, dk = jax.jit(lambda x, kern, g: native.depthwise_backward(x, kern, g, stride, dilation, True))(
      x, kernel, cotangent)
  _assert_close(y, want)
  for got, ref in zip((dx, dk), vjp(cotangent)):
    _assert_close(got, ref)
  assert np.all(np.asarray(dx)[x <= 0] == 0) and np.abs(dx).max() > 0.1
  x_nan = x.copy()
  x_nan[0, 0, 4, 4, 0] = np.nan  # even: read at stride 2 and dilation 2 too
  y_nan = np.asarray(native.depthwise_forward(x_nan, kernel, stride, dilation, True))
  assert np.isnan(y_nan).any() and np.isfinite(y_nan[:, 1:]).all()


def test_native_build_failure_is_one_clear_error(monkeypatch, tmp_path):
  """No working compiler: the build names the cause, 'auto' falls back to
  'shift' with a warning, and an explicit 'native' says what to use instead."""
  monkeypatch.setenv('CXX', '/bin/false')
  monkeypatch.setenv('SNAS_JAX_NATIVE_DIR', str(tmp_path))
  with pytest.raises(native.NativeBuildError, match='false failed on kernels.cc'):
    native._build(native._SOURCE, native._FLAGS)
  assert native.block_cache_library() is None  # the scripts then run without it
  monkeypatch.setattr(native, '_load', lambda: 'no compiler (test)')
  ops._warn_native_fallback.cache_clear()
  with pytest.warns(UserWarning, match=r'native CPU kernels unavailable \(no compiler \(test\)\)'):
    assert ops.resolve_impl('auto') == 'shift'
  with pytest.raises(native.NativeBuildError, match="Use impl='shift'"):
    ops.resolve_impl('native')
  ops._warn_native_fallback.cache_clear()


# Bytes per image of x (S·H·W·C) and g (D·S·H'·W'·C) below, at stride 2.
_STRIDE2_IMAGE_BYTES = (2 * 8 * 8 * 3 + 6 * 4 * 4 * 3) * 4


@pytest.mark.parametrize('slice_bytes,stride', [(1, 1), (2 * _STRIDE2_IMAGE_BYTES, 2)])
def test_depthwise_kernel_grad_in_slices_equals_lax(monkeypatch, slice_bytes, stride):
  """The kernel gradient's loop over slices of the batch (here 6 images in
  slices of 1, and of 2 at stride 2) gives lax's kernel gradient."""
  monkeypatch.setattr(ops, '_KERNEL_GRAD_SLICE_BYTES', slice_bytes)
  rng = np.random.default_rng(7)
  s, fan_out, k, dilation = 2, 3, 5, 2
  x = rng.normal(size=(s, 6, 8, 8, 3)).astype(np.float32)
  kernel = rng.normal(size=(k, k, fan_out * s, 3)).astype(np.float32)
  out = 8 // stride
  cotangent = rng.normal(size=(fan_out * s, 6, out, out, 3)).astype(np.float32)

  def dk(impl):  # a fresh jit: the slice size is read while tracing
    return jax.jit(lambda x, kern: jax.vjp(lambda kern: ops.depthwise_conv(
        x, kern, stride=stride, dilation=dilation, impl=impl), kern)[1](cotangent)[0])(x, kernel)
  jaxpr = str(jax.make_jaxpr(lambda kern: jax.vjp(lambda kern: ops.depthwise_conv(
      x, kern, stride=stride, dilation=dilation, impl='shift'), kern)[1](cotangent))(kernel))
  assert jaxpr.count('scan[') == 2  # the sliced path ran: slices, and taps inside
  _assert_close(dk('shift'), dk('lax'))


# relu_conv_bn (training-mode DilConv on CPU, with its hand-written VJP)
# against autodiff of the plain lax ops: (K, dilation, stride, fan_out, S,
# affine, remat), both VJP variants on both strides.
FUSED_CONFIGS = [(3, 1, 1, 1, 1, True, False), (5, 2, 2, 3, 2, False, False),
                 (3, 2, 1, 1, 2, True, True), (5, 1, 2, 3, 1, True, True)]


@functools.partial(jax.jit, static_argnames=('stride', 'dilation', 'remat'))
def _dilconv_fwd_bwd(args, cotangents, stride, dilation, remat):
  def plain(x, dw, pw, scale, bias):
    h = ops.pointwise_conv(ops.depthwise_conv(jax.nn.relu(x), dw, stride=stride,
                                              dilation=dilation, impl='lax'), pw)
    mean, var = ops._moments(h)
    return ops._normalize(h, mean, var, scale, bias), mean, var

  def fused(impl):
    return lambda *args: ops.relu_conv_bn(*args, stride, dilation, remat, impl)

  out = []
  for f in (plain, fused('shift'), fused('native')):
    y, vjp = jax.vjp(f, *args)
    out.append((y, vjp(cotangents)))
  return out


@pytest.mark.parametrize('k,dilation,stride,fan_out,s,affine,remat', FUSED_CONFIGS)
def test_relu_conv_bn_equals_autodiff_of_lax(k, dilation, stride, fan_out, s, affine, remat):
  """Outputs (normalised y, batch mean, variance) and every input's gradient,
  with non-zero cotangents on the statistics too (the VJP handles them,
  although the search's loss never differentiates them)."""
  rng = np.random.default_rng(k + 10 * stride + 100 * s)
  g, c, f = fan_out * s, 3, 4
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  args = (normal(s, 2, 8, 7, c), normal(k, k, g, c), normal(g, c, f),
          normal(g, f) if affine else None, normal(g, f) if affine else None)
  out_h, out_w = (8, 7) if stride == 1 else (4, 4)
  cotangents = (normal(g, 2, out_h, out_w, f), normal(g, f), normal(g, f))
  (y_plain, grads_plain), *fused = _dilconv_fwd_bwd(args, cotangents, stride, dilation, remat)
  for y_fused, grads_fused in fused:  # shift, native
    chex.assert_shape(y_fused[0], (g, 2, out_h, out_w, f))
    _assert_close(y_fused, y_plain)
    # Train-mode BN over 2·8·7 values divides by small standard deviations:
    # measured ≤ 5.3e-7 relative to each gradient's largest entry.
    _assert_close(grads_fused, grads_plain, rel=1e-5)
    assert all(np.abs(d).max() > 0 for d in jax.tree.leaves(grads_fused))
    assert (grads_fused[3] is None) == (not affine)


@pytest.mark.parametrize('k,dilation,stride,c', [(3, 1, 1, 16), (5, 2, 1, 32), (5, 1, 2, 8),
                                                   (3, 2, 2, 64)])
def test_native_fixed_shape_loops(k, dilation, stride, c):
  """The loops instantiated for the search's shapes (window and channel count
  compile-time constants: C in 8/16/32/64, 8-, 4- and 1-pixel groups, W = 13):
  the depthwise conv's forward and gradients and the DilConv's, against lax."""
  rng = np.random.default_rng(c + k)
  s, fan_out, n = 2, 2, 3
  g = s * fan_out
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  x, kernel = normal(s, n, 13, 13, c), normal(k, k, fan_out, s, c)
  y = native.depthwise_forward(x, kernel, stride, dilation, True)
  cotangent = normal(*y.shape)

  def plain(x, kern):
    return ops.depthwise_conv(jax.nn.relu(x), kern.reshape(k, k, g, c), stride=stride,
                              dilation=dilation, impl='lax').reshape(y.shape)
  want, vjp = jax.vjp(plain, x, kernel)
  _assert_close(y, want)
  for got, ref in zip(native.depthwise_backward(x, kernel, cotangent, stride, dilation, True),
                      vjp(cotangent)):
    _assert_close(got, ref)
  args = (x, normal(k, k, g, c), normal(g, c, c), normal(g, c), normal(g, c))
  cotangents = (normal(g, n, *y.shape[3:5], c), normal(g, c), normal(g, c))
  (y_plain, grads_plain), _, (y_native, grads_native) = _dilconv_fwd_bwd(
      args, cotangents, stride, dilation, False)
  _assert_close(y_native, y_plain)
  _assert_close(grads_native, grads_plain, rel=1e-5)


def test_native_dilconv_wide_channels():
  """The native DilConv's channel blocks (C = 20: one 16-wide block and four
  single channels; F = 24: a 16- and an 8-wide block), a batch in several
  threads' chunks (N = 10) and rows that are no multiple of the 8-pixel
  unroll (W = 11), stride 1, fan-out 2 over 2 sources, against autodiff of
  the lax ops."""
  rng = np.random.default_rng(21)
  s, fan_out, c, f, k = 2, 2, 20, 24, 3
  g = s * fan_out
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  args = (normal(s, 10, 9, 11, c), normal(k, k, g, c), normal(g, c, f), normal(g, f), normal(g, f))
  cotangents = (normal(g, 10, 9, 11, f), normal(g, f), normal(g, f))
  (y_plain, grads_plain), _, (y_native, grads_native) = _dilconv_fwd_bwd(args, cotangents, 1, 1, False)
  _assert_close(y_native, y_plain)
  _assert_close(grads_native, grads_plain, rel=1e-5)


def test_depthwise_hand_example():
  """3x3 all-ones kernel on a 3x3 ramp: each output = sum of its in-bounds window."""
  x = jnp.arange(9, dtype=jnp.float32).reshape(1, 1, 3, 3, 1)
  kernel = jnp.ones((3, 3, 1, 1))
  want = np.array([[8, 15, 12], [21, 36, 27], [20, 33, 24]], np.float32)
  for impl in ('lax', 'shift', 'native'):
    np.testing.assert_array_equal(ops.depthwise_conv(x, kernel, impl=impl)[0, 0, :, :, 0], want)
  with pytest.raises(ValueError, match='unknown op implementation'):
    ops.depthwise_conv(x, kernel, impl='cuda')


# ----------------------------------------------------------------------------
# Pools.


@functools.partial(jax.jit, static_argnames=('stride',))
def _mp_fwd_bwd(x, cotangent, stride):
  """(y, dx) for 'lax' and for 'shift': one compile for both."""
  def one(impl):
    y, vjp = jax.vjp(lambda x: ops.max_pool_3x3(x, stride=stride, impl=impl), x)
    return y, vjp(cotangent)[0]
  return one('lax'), one('shift')


@pytest.mark.parametrize('stride', [1, 2])
def test_max_pool_shift_equals_lax_with_ties(stride):
  """Values from {0, 1, 2}: most windows hold tied maxima. Each output's
  cotangent must go to exactly one tap, the one XLA's select-and-scatter
  (the gradient of lax.reduce_window) picks."""
  rng = np.random.default_rng(stride)
  x = rng.integers(0, 3, (2, 2, 8, 7, 3)).astype(np.float32)  # [S, N, H, W, C]
  out = (2, 2, 8 if stride == 1 else 4, 7 if stride == 1 else 4, 3)
  cotangent = rng.normal(size=out).astype(np.float32)
  (y_lax, dx_lax), (y_sh, dx_sh) = _mp_fwd_bwd(x, cotangent, stride)
  chex.assert_shape(y_sh, out)
  chex.assert_trees_all_equal(y_sh, y_lax)  # a max is exact
  _assert_close(dx_sh, dx_lax)  # sums of a few cotangents
  # Mass is conserved (one tap per output), and ties exist in this input.
  np.testing.assert_allclose(float(dx_sh.sum()), float(cotangent.sum()), rtol=1e-5)
  assert int((dx_sh != 0).sum()) < int((cotangent != 0).sum())


def test_max_pool_tie_gradient_hand_example():
  """Constant 3x3 input: every window is all ties; the gradient goes to the
  window's first in-bounds tap (row-major), i.e. (max(i−1,0), max(j−1,0))."""
  x = jnp.zeros((1, 3, 3, 1))
  want = np.array([[4, 2, 0], [2, 1, 0], [0, 0, 0]], np.float32)
  for impl, (_, dx) in zip(('lax', 'shift'), _mp_fwd_bwd(x, jnp.ones((1, 3, 3, 1)), 1)):
    np.testing.assert_array_equal(dx[0, :, :, 0], want, err_msg=impl)
  # And the values pad with −inf, not 0: an all-negative input keeps its max.
  neg = -1.0 - jnp.arange(9, dtype=jnp.float32).reshape(1, 3, 3, 1)
  for impl in ('lax', 'shift'):
    np.testing.assert_array_equal(
        ops.max_pool_3x3(neg, impl=impl)[0, :, :, 0],
        [[-1, -1, -2], [-1, -1, -2], [-4, -4, -5]])


@functools.partial(jax.jit, static_argnames=('kind', 'stride'))
def _pool_bn_fwd_bwd(x, cotangents, kind, stride):
  """(outputs, dx) of the native pool -> BN and of autodiff through lax's pool and a plain BN."""
  def plain(x):
    y = ops.pool_3x3(x, kind, stride, impl='lax')
    mean, var = ops._moments(y)
    return ops._normalize(y, mean, var, None, None), mean, var

  out = []
  for f in (plain, lambda x: ops.pool_bn(x, kind, stride)):
    y, vjp = jax.vjp(f, x)
    out.append((y, vjp(cotangents)[0]))
  return out


@pytest.mark.parametrize('kind,stride,c', [('max', 1, 3), ('max', 2, 24), ('avg', 1, 24),
                                           ('avg', 2, 3)])
def test_native_pool_bn_equals_autodiff_of_lax(kind, stride, c):
  """The native pool with its BN statistics and its backward pass (every
  cotangent non-zero) against autodiff of lax's pool and the plain BN; C 3
  runs the one-lane loops, C 24 the vector blocks. The max pool's input is
  tie-heavy (values in {0, 1, 2}): each window's gradient must go to the pixel
  XLA's select-and-scatter picks."""
  rng = np.random.default_rng(c + 10 * stride)
  s, n, h, w = 2, 2, 8, 7
  x = (rng.integers(0, 3, (s, n, h, w, c)) if kind == 'max' else rng.normal(size=(s, n, h, w, c)))
  out = (s, n, 8 if stride == 1 else 4, 7 if stride == 1 else 4, c)
  cotangents = tuple(rng.normal(size=shape).astype(np.float32) for shape in (out, (s, c), (s, c)))
  (y_plain, dx_plain), (y_native, dx_native) = _pool_bn_fwd_bwd(x.astype(np.float32), cotangents,
                                                                kind, stride)
  chex.assert_shape(y_native[0], out)
  _assert_close(y_native, y_plain)
  _assert_close(dx_native, dx_plain)
  assert np.abs(dx_native).max() > 0


def test_avg_pool_excludes_padding():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  y = ops.avg_pool_3x3(x)[0, :, :, 0]
  # Corner: mean of 4 pixels (0, 1, 4, 5), not their sum / 9.
  assert float(y[0, 0]) == pytest.approx((0 + 1 + 4 + 5) / 4)
  assert float(y[0, 1]) == pytest.approx((0 + 1 + 2 + 4 + 5 + 6) / 6)  # edge: 6 pixels
  assert float(y[1, 1]) == pytest.approx(sum([0, 1, 2, 4, 5, 6, 8, 9, 10]) / 9)
  assert float(y[3, 3]) == pytest.approx((10 + 11 + 14 + 15) / 4)
  # Stride 2 reads windows centred at (0, 0), (0, 2), (2, 0), (2, 2).
  y2 = ops.avg_pool_3x3(x, stride=2)[0, :, :, 0]
  # (0+1+4+5)/4, (1+2+3+5+6+7)/6, (4+5+8+9+12+13)/6, (5+6+7+9+10+11+13+14+15)/9
  np.testing.assert_allclose(y2, [[2.5, 4.0], [8.5, 10.0]], rtol=1e-6)
  # Against reduce_window (sum / in-bounds count) on an edge-batched tensor.
  @functools.partial(jax.jit, static_argnums=1)
  def both(x, stride):
    win, st = (1, 1, 3, 3, 1), (1, 1, stride, stride, 1)
    pad = ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0))
    total = lax.reduce_window(x, 0.0, lax.add, win, st, pad)
    count = lax.reduce_window(jnp.ones_like(x), 0.0, lax.add, win, st, pad)
    return ops.avg_pool_3x3(x, stride=stride), total / count
  x = np.random.default_rng(0).normal(size=(3, 2, 7, 6, 2)).astype(np.float32)
  for stride in (1, 2):
    _assert_close(*both(x, stride))


# ----------------------------------------------------------------------------
# Modules: the zero op, FactorizedReduce, parameter counts, fan-out.


def test_none_op_is_never_built():
  for stride in (1, 2):
    assert ops.make_op('none', 8, stride) is None
  with pytest.raises(ValueError, match="unknown op 'conv_7x1_1x7'"):
    ops.make_op('conv_7x1_1x7', 8, 1)
  for name in PRIMITIVES[1:]:
    assert ops.make_op(name, 8, 1) is not None


def test_factorized_reduce_hand_example():
  """C_in = 1, C_out = 2: channel 0 = 1·relu(x)[::2, ::2] (path a, weight 1),
  channel 1 = 2·relu(x)[1::2, 1::2] (path b, weight 2: x shifted by one pixel).
  Eval-mode BN with fresh statistics (mean 0, var 1) divides by sqrt(1 + eps)."""
  x = (jnp.arange(16, dtype=jnp.float32) - 5).reshape(1, 1, 4, 4, 1)
  # relu(x) = [[0 0 0 0] [0 0 1 2] [3 4 5 6] [7 8 9 10]]
  fr = ops.FactorizedReduce(2, affine=False, edge_axis=False)
  variables = {'params': {'conv_1': {'kernel': jnp.ones((1, 1, 1, 1))},
                          'conv_2': {'kernel': jnp.full((1, 1, 1, 1), 2.0)}},
               'batch_stats': {'bn': {'mean': jnp.zeros(2), 'var': jnp.ones(2)}}}
  shapes = jax.eval_shape(lambda: fr.init(jax.random.key(0), x, False))
  chex.assert_trees_all_equal_shapes(variables, shapes)  # the reference FactorizedReduce's
  y = jax.jit(lambda v, x: fr.apply(v, x, False))(variables, x)
  chex.assert_shape(y, (1, 1, 2, 2, 2))
  scale = 1 / math.sqrt(1 + ops.BN_EPSILON)
  np.testing.assert_allclose(y[0, 0, :, :, 0], np.array([[0, 0], [3, 5]]) * scale, rtol=1e-6)
  np.testing.assert_allclose(y[0, 0, :, :, 1], np.array([[0, 4], [16, 20]]) * scale, rtol=1e-6)
  with pytest.raises(ValueError, match='even channel count'):
    jax.eval_shape(lambda: ops.FactorizedReduce(3).init(jax.random.key(0), x, False))


def _param_count(module, x):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, True))
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(shapes.get('params', {})))


@pytest.mark.parametrize('fan_out,s', [(1, 1), (3, 2)])
def test_parameter_counts_match_spec_sizes(fan_out, s):
  """affine = False (search cells): docs/algorithm.md §4 sizes, times G = fan_out·S edges."""
  c, g = 16, fan_out * s
  x = jnp.zeros((s, 1, 8, 8, c))
  want = {
      ('sep_conv_3x3', 1): 2 * (c * 9 + c * c), ('sep_conv_5x5', 1): 2 * (c * 25 + c * c),
      ('sep_conv_3x3', 2): 2 * (c * 9 + c * c),
      ('dil_conv_3x3', 1): c * 9 + c * c, ('dil_conv_5x5', 2): c * 25 + c * c,
      ('skip_connect', 2): 2 * c * (c // 2), ('skip_connect', 1): 0,
      ('max_pool_3x3', 1): 0, ('avg_pool_3x3', 2): 0,
  }
  assert want[('sep_conv_3x3', 1)] == 800 and want[('dil_conv_5x5', 2)] == 656  # docs/algorithm.md §4
  for (name, stride), size in want.items():
    op = ops.make_op(name, c, stride, fan_out=fan_out, affine=False)
    assert _param_count(op, x) == g * size, (name, stride)
  # affine = True adds a BN scale and bias per channel per edge (2 BNs in sep).
  op = ops.make_op('sep_conv_3x3', c, 1, fan_out=fan_out, affine=True)
  assert _param_count(op, x) == g * (800 + 2 * 2 * c)
  op = ops.make_op('max_pool_3x3', c, 1, fan_out=fan_out, affine=True)
  assert _param_count(op, x) == g * 2 * c


def _edge_slice(tree, g):
  """Edge g's slice of an edge-batched variable tree: every variable has the
  reference edge batch's leading edge axis (a pool's BN without affine
  parameters too, though it runs once per source)."""
  return jax.tree.map(lambda leaf: leaf[g:g + 1], tree)


# (op, stride, affine, fan_out, S): every module type (SepConv, DilConv,
# Pool with BN after the fan-out (affine) and before it (non-affine),
# Identity, FactorizedReduce), fan_out 3 on S = 1 and fan_out 2 on S = 2.
FANOUT_CASES = [
    ('sep_conv_3x3', 1, True, 3, 1), ('dil_conv_5x5', 2, False, 2, 2),
    ('max_pool_3x3', 2, False, 3, 1), ('avg_pool_3x3', 1, True, 2, 2),
    ('skip_connect', 1, False, 3, 1), ('skip_connect', 2, True, 3, 1),
    ('sep_conv_5x5', 2, False, 2, 2),
]


@pytest.mark.parametrize('name,stride,affine,fan_out,s', FANOUT_CASES)
def test_fan_out_gives_independent_edges(name, stride, affine, fan_out, s):
  """fan_out·S edges == that many single-edge ops with the matching parameter
  slices (train-mode BN: per-edge batch statistics, also checked)."""
  c, g_total = 4, fan_out * s
  rng = np.random.default_rng(1)
  x = rng.normal(size=(s, 3, 8, 6, c)).astype(np.float32)
  # impl 'lax' (faster to compile); 'shift' == 'lax' is tested above.
  op = ops.make_op(name, c, stride, fan_out=fan_out, affine=affine, impl='lax')
  # Random values in the module's own variable layout (eval_shape: no
  # compile), BN scale/bias/statistics included so a mixed-up edge would show.
  # Slicing and comparing in numpy (no eager-op compiles).
  shapes = jax.eval_shape(lambda: op.init(jax.random.key(2), x, True))
  variables = jax.tree_util.tree_map(
      lambda v: rng.normal(size=v.shape).astype(np.float32), shapes)
  y, new_stats = jax.device_get(
      jax.jit(lambda v, x: op.apply(v, x, True, mutable=['batch_stats']))(variables, x))
  single = ops.make_op(name, c, stride, fan_out=1, affine=affine, impl='lax')
  apply_single = jax.jit(lambda v, x: single.apply(v, x, True, mutable=['batch_stats']))
  assert y.shape[0] == g_total
  for g in range(g_total):
    y_g, stats_g = apply_single(_edge_slice(variables, g), x[g % s:g % s + 1])
    _assert_close(y[g:g + 1], y_g)
    _assert_close(_edge_slice(new_stats, g), stats_g)


@pytest.mark.parametrize('fan_out,s,keep_per_image,raw', [(1, 2, False, False), (3, 2, True, False),
                                                       (3, 2, True, True), (2, 1, False, True)])
def test_mix_edges_matches_autodiff(fan_out, s, keep_per_image, raw):
  """The mixer's custom VJP against autodiff of the plain sum over edges and
  ops into the destinations, with one shared (per-source) term, two per-edge
  terms, drop-path scales per edge (and per image) and, with ``raw``, a
  DilConv's output before BN, (h, mean, var), that the mixer normalises
  (its backward is native: C = 12 runs its 8-lane block and single lanes)."""
  rng = np.random.default_rng(fan_out + 10 * raw)
  g, n, c = fan_out * s, 2, 12 if raw else 5
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  terms = (normal(s, n, 3, 4, c), normal(g, n, 3, 4, c), normal(g, n, 3, 4, c))
  if raw:
    h = normal(g, n, 3, 4, c) * 2.0 + 0.5
    terms += ((h, h.mean((1, 2, 3)) + normal(g, c) * 0.1, h.var((1, 2, 3)) + 0.3),)
  weights = normal(g, len(terms))
  keep = rng.choice([0.0, 2.0], size=(g, n if keep_per_image else 1)).astype(np.float32)
  cotangents = tuple(normal(n, 3, 4, c) for _ in range(fan_out))

  def plain(terms, weights):
    full = [ops.fan_out_edges(terms[0], fan_out)] + list(terms[1:3])
    if raw:
      h, mean, var = terms[3]
      full.append((h - mean[:, None, None, None]) / jnp.sqrt(var[:, None, None, None] + ops.BN_EPSILON))
    edges = sum(t * weights[:, k, None, None, None, None] for k, t in enumerate(full))
    edges = edges * keep[:, :, None, None, None]
    return tuple(edges[d * s:(d + 1) * s].sum(0) for d in range(fan_out))

  @jax.jit
  def both(terms, weights):
    out = []
    for f in (lambda t, w: ops.mix_edges(t, w, keep, fan_out), plain):
      y, vjp = jax.vjp(f, terms, weights)
      out.append((y,) + vjp(cotangents))
    return out
  (y, d_terms, d_w), (y_ref, d_terms_ref, d_w_ref) = both(terms, weights)
  assert len(y) == fan_out
  chex.assert_shape(y, [(n, 3, 4, c)] * fan_out)
  _assert_close(y, y_ref)
  _assert_close(d_terms, d_terms_ref)
  _assert_close(d_w, d_w_ref)
  assert float(np.abs(d_w_ref).max()) > 0.1
  if raw:  # BN's cotangents reach the statistics
    assert min(float(np.abs(d).max()) for d in d_terms_ref[3]) > 1e-3


@pytest.mark.parametrize('k,dilation,stride,raw_input', [(3, 1, 1, False), (5, 2, 2, False),
                                                      (5, 1, 1, True), (3, 2, 2, True)])
def test_dilconv_raw_equals_autodiff_of_lax(k, dilation, stride, raw_input):
  """The native DilConv before BN, (h, batch mean, batch variance), and its
  VJP for cotangents on all three, against autodiff of the lax ops; with
  ``raw_input`` its input is such a triple of the DilConv before, which it
  normalises itself (a SepConv's second half: the gradients reach the triple)."""
  rng = np.random.default_rng(k + stride + 10 * raw_input)
  s, fan_out, n, c, f = 2, 2, 3, 16, 8
  g = s * fan_out
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  x = normal(s, n, 9, 9, c)
  if raw_input:  # statistics near the batch's, as a BN has them
    x = (x * 1.5 + 0.3, x.mean((1, 2, 3)) * 1.5 + 0.3 + normal(s, c) * 0.1,
         x.var((1, 2, 3)) * 2.25 + normal(s, c) ** 2 * 0.1)
  args = (x, normal(k, k, g, c), normal(g, c, f))
  size = 9 if stride == 1 else 5
  cotangents = (normal(g, n, size, size, f), normal(g, f), normal(g, f))

  def plain(x, dw, pw):
    if isinstance(x, tuple):
      h, mean, var = x
      x = (h - mean[:, None, None, None]) * lax.rsqrt(var[:, None, None, None] + ops.BN_EPSILON)
    h = ops.pointwise_conv(ops.depthwise_conv(jax.nn.relu(x), dw, stride=stride,
                                              dilation=dilation, impl='lax'), pw)
    return (h, *ops._moments(h))

  @jax.jit
  def both(args):
    outs = []
    for fn in (plain, lambda *a: ops.dilconv_raw(*a, stride, dilation)):
      y, vjp = jax.vjp(fn, *args)
      outs.append((y, vjp(cotangents)))
    return outs
  (y_ref, grads_ref), (y, grads) = both(args)
  _assert_close(y, y_ref)
  _assert_close(grads, grads_ref, rel=1e-5)
  assert all(float(np.abs(d).max()) > 0 for d in jax.tree.leaves(grads))


def test_avg_pool_gradient_matches_reduce_window():
  """The avg pool's custom VJP against autodiff of reduce_window sums, strides 1 and 2
  (odd size: the stride-2 windows do not tile the input)."""
  x = np.random.default_rng(3).normal(size=(2, 2, 7, 6, 3)).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=1)
  def grads(x, stride):
    def ref(x):
      win, st = (1, 1, 3, 3, 1), (1, 1, stride, stride, 1)
      pad = ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0))
      total = lax.reduce_window(x, 0.0, lax.add, win, st, pad)
      return total / lax.reduce_window(jnp.ones_like(x), 0.0, lax.add, win, st, pad)
    mine = lambda x: ops.avg_pool_3x3(x, stride=stride)
    cot = jnp.sin(jnp.arange(ref(x).size, dtype=jnp.float32)).reshape(ref(x).shape)
    return [jax.vjp(f, x)[1](cot)[0] for f in (mine, ref)]
  for stride in (1, 2):
    got, want = grads(x, stride)
    assert float(np.abs(want).max()) > 0.1
    _assert_close(got, want)


def test_materialize_is_exact_and_stays_a_dot_on_cpu():
  """materialize (and the cotangent of materialize_grad) returns x bit for bit,
  and the compiled CPU program keeps the dot that makes XLA compute x once."""
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 4, 16)) * 1e3, jnp.float32)
  np.testing.assert_array_equal(jax.jit(ops.materialize)(x), x)
  g = jax.grad(lambda x: jnp.sum(ops.materialize_grad(x) * x))(x)  # d/dx Σ x² = 2x
  np.testing.assert_array_equal(g, 2 * x)
  hlo = jax.jit(ops.materialize).lower(x).compile().as_text()
  assert ' dot(' in hlo
