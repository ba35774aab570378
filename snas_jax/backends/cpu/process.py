"""The process settings XLA:CPU wants, applied by the entry scripts when the
CPU backend runs (``configure``), never on import and never off the CPU.

* XLA:CPU's memory-minimising scheduler: the default one runs independent ops
  side by side and keeps more buffers alive.
* ``--cpu_devices``: the CPU split into several XLA devices, the batch split
  over them; by default (``default_devices``) one device per core for a space
  whose networks run as the reference modules (NB201), one device for a space
  with the backend's forms (DARTS).
* Memory tuning. XLA:CPU mallocs a train step's temporaries (2.6 GB at the
  paper's search configuration) when the step starts and frees them when it
  ends, so by default the kernel maps and zeroes them afresh every step. The
  dynamic loader and glibc read their settings only at start-up, hence one
  restart (``restart_with_memory_tuning``):
  - native/block_cache.cc, preloaded, keeps freed large blocks (>= 64 MB),
    one per device running at once, mapped for the next step (no faults,
    no zeroing);
  - glibc backs its blocks with transparent huge pages and keeps the heap it
    frees (trim threshold 1 GB) for blocks up to 32 MB (mmap threshold: its
    maximum), which YNNPACK's matmuls allocate and free per call.
  Each glibc setting only where the user has not set it.
* After each long compile, glibc hands the heap the compiler freed back to
  the OS (``malloc_trim``); otherwise the step's temporaries come on top.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

from snas_jax.backends.cpu import native

HUGE_PAGES = 'glibc.malloc.hugetlb=1'
KEEP_HEAP = ('glibc.malloc.trim_threshold=1073741824', 'glibc.malloc.mmap_threshold=33554432')
_TUNED = 'SNAS_JAX_MEMORY_TUNED'  # set in the restarted process: restart once


# Spaces whose networks take this backend's forms (forms.py): their native kernels
# run on one device and spread each call's images over the cores themselves.
FORMS_SPACES = frozenset({'darts'})
# Fewest images a device keeps when the batch is split by default: a half batch
# of 32 runs its convolutions at ~80% of a core's FMA peak (docs/performance.md).
MIN_IMAGES_PER_DEVICE = 16


def default_devices(space: str, batch_sizes, processes: int = 1, cores: int | None = None) -> int:
  """The XLA devices a host's CPU is split into when --cpu_devices is 0.

  A space with the backend's forms: 1. Otherwise (NB201, whose reference
  modules run) one device per core: XLA:CPU runs each convolution (YNNPACK)
  on one thread, so on one device the other cores idle through the
  convolutions, while devices run side by side (NB201's search step: 1.3x
  on 2 cores, docs/performance.md). The count is the largest that divides
  every batch and leaves each device MIN_IMAGES_PER_DEVICE images; a
  multi-process run keeps one device per process."""
  if space in FORMS_SPACES or processes != 1:
    return 1
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
  for n in range(cores, 1, -1):
    if all(b % n == 0 and b // n >= MIN_IMAGES_PER_DEVICE for b in batch_sizes):
      return n
  return 1


def configure(tune_memory: bool, cpu_devices: int) -> None:
  """Applies every setting; before JAX starts its CPU backend."""
  if tune_memory:
    restart_with_memory_tuning()
  default_xla_flag('--xla_cpu_scheduler_type', 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED')
  if cpu_devices:
    default_xla_flag('--xla_force_host_platform_device_count', cpu_devices)
  trim_heap_after_compiles()


def default_xla_flag(flag: str, value) -> None:
  """Adds ``flag=value`` to XLA_FLAGS unless the user set that flag."""
  current = os.environ.get('XLA_FLAGS', '')
  if flag not in current:
    os.environ['XLA_FLAGS'] = f'{current} {flag}={value}'.strip()


def restart_with_memory_tuning() -> None:
  """Re-executes this script once with ``memory_tuning_env``; a no-op in the
  restarted process or without glibc."""
  env = memory_tuning_env()
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def memory_tuning_env() -> dict | None:
  """os.environ for a new process with GLIBC_TUNABLES asking for huge pages
  (glibc >= 2.35) and a kept heap, and LD_PRELOAD adding the block cache (where it builds);
  None in a process that has them already, or without glibc."""
  libc, version = platform.libc_ver()
  if os.environ.get(_TUNED) or libc != 'glibc':
    return None
  env = dict(os.environ, **{_TUNED: '1'})
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  wanted = (HUGE_PAGES,) if tuple(int(v) for v in version.split('.')[:2]) >= (2, 35) else ()
  added = [t for t in wanted + KEEP_HEAP if t.split('=')[0] + '=' not in tunables]
  if added:
    env['GLIBC_TUNABLES'] = ':'.join(filter(None, [tunables, *added]))
  cache = native.block_cache_library()
  if cache is not None:
    env['LD_PRELOAD'] = ':'.join(filter(None, [os.environ.get('LD_PRELOAD', ''), cache]))
  return env


def memory_tuning() -> str:
  """The settings this process runs with: 'huge pages', 'heap kept' (glibc's
  trim threshold as KEEP_HEAP's), 'block cache', joined by ' + ', or 'off'."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  active = [name for name, on in (
      ('huge pages', HUGE_PAGES in tunables), ('heap kept', KEEP_HEAP[0] in tunables),
      ('block cache', 'block_cache' in os.environ.get('LD_PRELOAD', ''))) if on]
  return ' + '.join(active) or 'off'


def trim_heap_after_compiles(min_seconds: float = 1.0) -> None:
  """After every XLA compilation of at least ``min_seconds`` (or load from the
  persistent cache), glibc's malloc_trim; elsewhere a no-op."""
  import jax  # after the XLA flags above are set
  try:
    malloc_trim = ctypes.CDLL('libc.so.6').malloc_trim
  except (OSError, AttributeError):
    return

  def listener(event, duration_secs, **_):
    if event == '/jax/core/compile/backend_compile_duration' and duration_secs >= min_seconds:
      malloc_trim(0)

  jax.monitoring.register_event_duration_secs_listener(listener)
