"""snas_jax/backends/cpu/native/block_cache.cc: the malloc front end the entry scripts
preload (backends/cpu/process.py). Each check runs in a fresh process
with the library preloaded, as the scripts run."""
import os
import subprocess
import sys

import jax
import pytest

from snas_jax.backends.cpu import native

# The CPU backend runs on the CPU: skipped where JAX runs on another platform.
pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu',
                                reason='the CPU backend runs on the CPU only')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECKS = r"""
import ctypes
import numpy as np
libc = ctypes.CDLL(None)
for name in ('malloc', 'calloc', 'realloc', 'aligned_alloc'):
  getattr(libc, name).restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.restype = ctypes.c_size_t
libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
MB = 1 << 20

# Never more resident than the process held: a step's block freed while the
# next step's is live (born later: not a twin) is not kept; a request the kept
# block does not fit drops it.
import threading, time

def fresh(ptr, size):  # zero: a new mapping, not a kept block
  return not any(ctypes.string_at(ptr + i * MB, 64).strip(b'\0') for i in range(0, size, 50))
h1 = libc.malloc(300 * MB)
time.sleep(0.3)
h2 = libc.malloc(300 * MB)  # waits 0.1 s for h1's free, then maps
ctypes.memset(h1, 3, 300 * MB)
libc.free(h1)  # h2 is live and of its size: unmapped
h3 = libc.malloc(300 * MB)
print('twin not kept', fresh(h3, 300))
ctypes.memset(h3, 4, 300 * MB)
libc.free(h3)
ctypes.memset(h2, 5, 300 * MB)
libc.free(h2)  # kept (no twin left)
h4 = libc.malloc(100 * MB)  # does not fit: h2 dropped
h5 = libc.malloc(300 * MB)
print('dropped for a new mapping', fresh(h5, 300))
libc.free(h4)
libc.free(h5)

a = libc.malloc(300 * MB)
print('usable', libc.malloc_usable_size(a) >= 300 * MB)
ctypes.memset(a, 7, 300 * MB)
libc.free(a)
b = libc.malloc(290 * MB)  # about the size of the freed block: the same mapping
print('reused', b == a, ctypes.string_at(b + 200 * MB, 16) == bytes([7]) * 16)  # not remapped
c = libc.calloc(290, MB)  # the cached block is taken: a new mapping, zero
print('calloc zero', not any(ctypes.string_at(c + i * MB, 64).strip(b'\0') for i in range(290)))
ctypes.memset(c, 9, 290 * MB)
libc.free(c)
d = libc.calloc(280, MB)  # reuses c's block, which held data: zeroed
print('reused zero', d == c, ctypes.string_at(d + 100 * MB, 64) == bytes(64))
libc.free(d)
e = libc.malloc(100 * MB)  # far smaller than the cached block: not given it
print('small not reused', e != d)
ctypes.memset(b, 5, 290 * MB)
f = libc.realloc(b, 400 * MB)  # contents kept
print('realloc', ctypes.string_at(f + 289 * MB, 16) == bytes([5]) * 16)
p = ctypes.c_void_p()
print('posix_memalign', libc.posix_memalign(ctypes.byref(p), 4096, 200 * MB) == 0 and p.value % 4096 == 0)
print('bad alignment', libc.posix_memalign(ctypes.byref(p), 3, 200 * MB))
g = libc.aligned_alloc(64, 128 * MB)
print('aligned_alloc', g % 64 == 0)
for ptr in (e, f, g):
  libc.free(ptr)
small = libc.malloc(100)  # glibc's
print('small usable', 100 <= libc.malloc_usable_size(small) < 200)
libc.free(small)
# Twins (devices' temporaries, born together) are kept, one block each.
t1, t2 = libc.malloc(300 * MB), libc.malloc(300 * MB)
ctypes.memset(t1, 1, 300 * MB)
ctypes.memset(t2, 2, 300 * MB)
libc.free(t1)
libc.free(t2)
t3, t4 = libc.malloc(300 * MB), libc.malloc(300 * MB)
print('twins kept', {t3, t4} == {t1, t2}, not fresh(t3, 300) and not fresh(t4, 300))
time.sleep(0.3)
t5 = libc.malloc(300 * MB)  # born later: not their twin (waits 0.1 s for their free)
ctypes.memset(t5, 5, 300 * MB)
for ptr in (t3, t4, t5):  # t3 is freed while two of its size are live: unmapped
  libc.free(ptr)
u = [libc.malloc(300 * MB) for _ in range(3)]
print('no more kept than twins', sorted(fresh(ptr, 300) for ptr in u))
for ptr in u:
  libc.free(ptr)
libc.free(libc.malloc(100 * MB))  # a request they do not fit: the kept blocks are dropped
# A request that an old live block would serve waits for its free (XLA frees
# a step's temporaries just after the next step asks for its own); a young
# twin (devices running at once) is not waited for, nor an old one forever.

w1 = libc.malloc(300 * MB)
ctypes.memset(w1, 6, 300 * MB)
time.sleep(0.3)
threading.Timer(0.02, libc.free, (w1,)).start()
w2 = libc.malloc(300 * MB)  # ctypes lets go of the GIL: the timer frees w1 meanwhile
print('old twin awaited', w2 == w1, ctypes.string_at(w2 + 250 * MB, 16) == bytes([6]) * 16)
y1 = libc.malloc(300 * MB)  # young
t = time.perf_counter()
y2 = libc.malloc(300 * MB)
print('young twin not awaited', y2 != y1, time.perf_counter() - t < 0.09)
time.sleep(0.3)
t = time.perf_counter()
y3 = libc.malloc(300 * MB)  # y1 and y2 are old now and never freed meanwhile
print('waits at most 0.1 s', y3 not in (y1, y2), 0.09 < time.perf_counter() - t < 2.0)
for ptr in (w2, y1, y2, y3):
  libc.free(ptr)
x = np.arange(50_000_000, dtype=np.float64)  # 400 MB through numpy
print('numpy', float((x * 2).sum()) == 2 * 49_999_999 * 50_000_000 / 2)
"""

EXPECTED = """twin not kept True
dropped for a new mapping True
usable True
reused True True
calloc zero True
reused zero True True
small not reused True
realloc True
posix_memalign True
bad alignment 22
aligned_alloc True
small usable True
twins kept True True
no more kept than twins [False, False, True]
old twin awaited True True
young twin not awaited True True
waits at most 0.1 s True True
numpy True
"""


@pytest.mark.skipif(native.block_cache_library() is None, reason='no C++ compiler')
def test_block_cache_reuses_freed_large_blocks_and_is_a_correct_malloc():
  env = dict(os.environ, LD_PRELOAD=native.block_cache_library())
  proc = subprocess.run([sys.executable, '-c', CHECKS], capture_output=True, text=True, env=env,
                        timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout == EXPECTED
