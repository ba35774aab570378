"""Hand-written CPU kernels (XLA FFI custom calls), built on first use.

``kernels.cc`` holds the edge-batched depthwise convolution's forward pass
and its backward pass (input and kernel gradients in one call), the
training-mode DilConv (ReLU -> depthwise -> 1x1 conv with BN's batch
statistics, optionally of an input normalised on its way in; its backward
pass in two calls, or one when the consumer hands over BN's cotangents), the
training-mode 3x3 pools with their BN's statistics, and the cell mixer's
backward pass for the DilConv outputs it normalises itself, each looping
over one image at a time on XLA's intra-op threads. On XLA:CPU a DilConv's ~34 fused kernels become three calls
and a few elementwise kernels (docs/cpu_backend.md).

The library is compiled from source with the machine's C++ compiler the first
time it is needed (``-march=native``: it runs where it was built) and cached
under ``~/.cache/snas_jax/native`` (``SNAS_JAX_NATIVE_DIR`` moves it), keyed by
the source, the compiler, jaxlib and the CPU, so a fresh clone needs no build
step. Without a compiler ``available()`` is False and ops fall back to XLA
('shift'); ``SNAS_JAX_NATIVE=0`` forces that fallback.

``block_cache.cc`` is not a kernel but a malloc front end that keeps XLA's
per-step temporaries mapped between steps; the entry scripts preload it
(``cli.restart_with_memory_tuning``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCE = Path(__file__).with_name('kernels.cc')
_BLOCK_CACHE = Path(__file__).with_name('block_cache.cc')
_FLAGS = ['-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w']
_TARGETS = {'snas_depthwise_forward': 'SnasDepthwiseForward',
            'snas_depthwise_backward': 'SnasDepthwiseBackward',
            'snas_dilconv_forward': 'SnasDilConvForward',
            'snas_bn_grad_sums': 'SnasBnGradSums',
            'snas_dilconv_backward': 'SnasDilConvBackward',
            'snas_pool_forward': 'SnasPoolForward',
            'snas_pool_backward': 'SnasPoolBackward',
            'snas_mix_grad_raw': 'SnasMixGradRaw'}


class NativeBuildError(RuntimeError):
  """The kernels did not build; an entry script prints it as one line."""


def _cpu_id() -> bytes:
  try:
    with open('/proc/cpuinfo', 'rb') as f:
      return b''.join(sorted({l for l in f if l.startswith((b'model name', b'flags'))}))
  except OSError:
    return b''


def _build(source: Path, flags: list, includes: tuple = ()) -> Path:
  """source compiled into a shared library in the cache (built once per key)."""
  cxx = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++') or shutil.which('clang++')
  if not cxx:
    raise NativeBuildError('no C++ compiler found (install g++ or set CXX)')
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True).stdout
  key = hashlib.sha256(b'\0'.join([source.read_bytes(), ' '.join(flags).encode(),
                                   version.encode(), jaxlib.__version__.encode(),
                                   _cpu_id()])).hexdigest()[:16]
  out_dir = Path(os.path.expanduser(os.environ.get('SNAS_JAX_NATIVE_DIR',
                                                   '~/.cache/snas_jax/native')))
  library = out_dir / f'{source.stem}-{key}.so'
  if library.exists():
    return library
  out_dir.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: processes building at once (several
  # hosts' processes on one machine) never load a half-written file.
  with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
    part = Path(tmp) / library.name
    done = subprocess.run([cxx, *flags, *(f'-I{d}' for d in includes), str(source), '-o', str(part)],
                          capture_output=True, text=True)
    if done.returncode:
      raise NativeBuildError(f'{cxx} failed on {source.name}: {done.stderr.strip()[-2000:]}')
    os.replace(part, library)
  return library


def block_cache_library() -> str | None:
  """block_cache.cc built (the malloc front end that the entry scripts
  preload, cli.restart_with_memory_tuning); None where it cannot build."""
  if os.environ.get('SNAS_JAX_NATIVE', '1') == '0':
    return None
  try:
    return str(_build(_BLOCK_CACHE, ['-O2', '-std=c++17', '-shared', '-fPIC', '-w']))
  except (NativeBuildError, OSError):
    return None


@functools.cache
def _load() -> str | None:
  """Builds and registers the kernels once; None if it worked, else why not."""
  if os.environ.get('SNAS_JAX_NATIVE', '1') == '0':
    return 'SNAS_JAX_NATIVE=0'
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(_SOURCE, _FLAGS, (jax.ffi.include_dir(),))))
  except (NativeBuildError, OSError, AttributeError) as e:
    return str(e)
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  return None


def available() -> bool:
  """Whether the native kernels can run here (builds them on the first call)."""
  return _load() is None


def require():
  problem = _load()
  if problem is not None:
    raise NativeBuildError(f"impl='native' needs the CPU kernels, which did not build: {problem}. "
                           "Use impl='shift' (or 'auto') instead.")


def fallback_reason() -> str | None:
  return _load()


def _attrs(stride, dilation, relu):
  return dict(stride=np.int64(stride), dilation=np.int64(dilation), relu=bool(relu))


def _out_hw(x, k, stride, dilation):
  """(H', W') of a 'same'-padded KxK window op on x [S,N,H,W,C]."""
  pad = dilation * (k - 1) // 2
  return tuple((size + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for size in x.shape[2:4])


def depthwise_forward(x, kernel, stride: int, dilation: int, relu: bool):
  """x [S,N,H,W,C], kernel [K,K,D,S,C] -> [D,S,N,H',W',C] (x through ReLU first if relu)."""
  require()
  shape = (kernel.shape[2],) + x.shape[:2] + _out_hw(x, kernel.shape[0], stride, dilation) + x.shape[-1:]
  shape = jax.ShapeDtypeStruct(shape, x.dtype)
  return jax.ffi.ffi_call('snas_depthwise_forward', shape)(x, kernel, **_attrs(stride, dilation, relu))


def depthwise_backward(x, kernel, g, stride: int, dilation: int, relu: bool):
  """(dx [S,N,H,W,C], dkernel [K,K,D,S,C]) for the cotangent g [D,S,N,H',W',C] of
  ``depthwise_forward``; dx summed over the D edges and zero where ReLU clipped x."""
  require()
  shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))
  return jax.ffi.ffi_call('snas_depthwise_backward', shapes)(x, kernel, g,
                                                              **_attrs(stride, dilation, relu))


def _norm_arg(x, norm):
  """The DilConv calls' input normalisation: [2,S,C] and whether it applies."""
  if norm is None:
    return jnp.zeros((2, x.shape[0], x.shape[-1]), x.dtype), False
  return norm, True


def dilconv_forward(x, kernel, pw, stride: int, dilation: int, norm=None):
  """ReLU -> depthwise -> 1x1 of x [S,N,H,W,C] with kernel [K,K,D,S,C] and pw
  [G,C,F] (G = D·S): (h [G,N,H',W',F], its batch mean and biased variance [G,F]).
  ``norm`` [2,S,C] (mean, rstd): the ReLU's input is (x − mean)·rstd instead."""
  require()
  g, f = pw.shape[0], pw.shape[2]
  h_shape = (g, x.shape[1]) + _out_hw(x, kernel.shape[0], stride, dilation) + (f,)
  stats = jax.ShapeDtypeStruct((g, f), x.dtype)
  norm, normalized = _norm_arg(x, norm)
  return jax.ffi.ffi_call('snas_dilconv_forward', (jax.ShapeDtypeStruct(h_shape, x.dtype), stats, stats))(
      x, kernel, pw, norm, stride=np.int64(stride), dilation=np.int64(dilation),
      normalized=normalized)


def bn_grad_sums(h, dy, mean):
  """(Σ dy, Σ dy·(h − mean)) over (N, H', W'): h, dy [G,N,H',W',F], mean [G,F] -> 2 x [G,F]."""
  require()
  stats = jax.ShapeDtypeStruct(mean.shape, mean.dtype)
  return jax.ffi.ffi_call('snas_bn_grad_sums', (stats, stats))(h, dy, mean)


def dilconv_backward(x, kernel, pw, h, dy, coef, stride: int, dilation: int, norm=None):
  """(dx, dkernel, dpw) of ``dilconv_forward`` for the gradient reaching h,
  dh = A·dy + B·(h − mean) + C0 with coef = [A, B, C0, mean] ([4,G,F]).
  With ``norm`` (see dilconv_forward) also [2,S,C]: Σ t and Σ t·x1 over
  (N, H, W), t the gradient reaching x1 = (x − mean)·rstd (dx = rstd·t)."""
  require()
  norm, normalized = _norm_arg(x, norm)
  shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, kernel, pw, norm))
  out = jax.ffi.ffi_call('snas_dilconv_backward', shapes)(
      x, kernel, pw, h, dy, coef, norm, stride=np.int64(stride), dilation=np.int64(dilation),
      normalized=normalized)
  return out if normalized else out[:3]


def pool_forward(x, stride: int, kind: str):
  """The 3x3 'max' or 'avg' pool (padding 1, left out of the average's count)
  of x [S,N,H,W,C]: (y [S,N,H',W',C], its batch mean and biased variance [S,C])."""
  require()
  s, n, h, w, c = x.shape
  y = jax.ShapeDtypeStruct((s, n, (h - 1) // stride + 1, (w - 1) // stride + 1, c), x.dtype)
  stats = jax.ShapeDtypeStruct((s, c), x.dtype)
  return jax.ffi.ffi_call('snas_pool_forward', (y, stats, stats))(
      x, stride=np.int64(stride), is_max=kind == 'max')


def pool_backward(x, yhat, dy, coef, stride: int, kind: str):
  """dx [S,N,H,W,C] of ``pool_forward`` for the gradient reaching y written as
  A·dy + B·yhat + C0, coef = [A, B, C0] ([3,S,C])."""
  require()
  return jax.ffi.ffi_call('snas_pool_backward', jax.ShapeDtypeStruct(x.shape, x.dtype))(
      x, yhat, dy, coef, stride=np.int64(stride), is_max=kind == 'max')


def mix_grad_raw(g, keep, h, mean, rstd, w):
  """The mixer's backward for a term it normalises, (h − mean)·rstd:
  (dh = w·keep·rstd·g [G,N,H,W,F], Σ keep·g·(h − mean) and Σ keep·g over
  (N, H, W) [G,F]). g [D,N,H,W,F] (edge e = d·S + s reads g[e // S]);
  keep [G,N]; mean, rstd [G,F]; w [G]."""
  require()
  stats = jax.ShapeDtypeStruct(mean.shape, mean.dtype)
  return jax.ffi.ffi_call('snas_mix_grad_raw', (jax.ShapeDtypeStruct(h.shape, h.dtype), stats, stats))(
      g, keep, h, mean, rstd, w)


def warn_fallback():
  warnings.warn(f'snas_jax: native CPU kernels unavailable ({fallback_reason()}); '
                'using the slower XLA ops (impl=shift)', stacklevel=3)
