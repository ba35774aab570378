"""What every entry script shares: runtime flags, start-up, one-line errors.

An experiment script is three lines: define its config's flags, define these,
and ``app.run(lambda argv: cli.main(run_fn, ConfigClass))``.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys

# TensorFlow (tf.data, TensorBoard) is chatty at start-up; keep its warnings only.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import snas_jax  # noqa: E402
from absl import flags, logging  # noqa: E402

from snas_jax import config as config_lib  # noqa: E402
from snas_jax import native  # noqa: E402
from snas_jax import parallel  # noqa: E402
from snas_jax import trainer  # noqa: E402

FLAGS = flags.FLAGS

# Errors a user can fix from the command line: printed as one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, native.NativeBuildError)


# XLA:CPU allocates a train step's temporaries (2.6 GB at the paper's search
# configuration) with malloc when the step starts and frees them when it ends,
# so by default the kernel maps and zeroes them afresh every step, 4 KB at a
# time. These settings fix that; the dynamic loader and glibc read them only at
# start-up, hence a restart (restart_with_memory_tuning):
# - snas_jax/native/block_cache.cc, preloaded, keeps the last freed large block
#   (>= 64 MB) mapped for the next step (no faults, no zeroing; README, Performance);
# - glibc backs its blocks with transparent huge pages (512x fewer faults) and
#   keeps the heap it frees (trim threshold 1 GB) for blocks up to 32 MB (mmap
#   threshold: its maximum), which YNNPACK's matmuls allocate and free per call:
#   with the heap trimmed, the kernel faulted and zeroed 2,000-4,000 huge pages
#   per paper search step, ~10% of it (tenth session, AMD EPYC).
# Each glibc setting only where the user has not set it.
HUGE_PAGES = 'glibc.malloc.hugetlb=1'
KEEP_HEAP = ('glibc.malloc.trim_threshold=1073741824', 'glibc.malloc.mmap_threshold=33554432')
_TUNED = 'SNAS_JAX_MEMORY_TUNED'  # set in the restarted process: restart once


def restart_with_memory_tuning() -> None:
  """Re-executes this script once with both settings (``memory_tuning_env``);
  a no-op in the restarted process or without glibc."""
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


def define_runtime_flags(summary: bool = False) -> None:
  """The flags every script has; ``summary`` adds --summary (sizes only)."""
  if summary:
    flags.DEFINE_bool('summary', False, 'Print the parameters (M, auxiliary head excluded) and '
                      'multiply-adds (M) per image of the network, then exit (no --workdir needed).')
  flags.DEFINE_string('workdir', '', 'Folder for checkpoints and outputs (resumes if it holds one).')
  flags.DEFINE_bool('tune_memory', True, "Restart once so that XLA's per-step temporaries stay "
                    'mapped between steps and sit on transparent huge pages (LD_PRELOAD of '
                    'snas_jax/native/block_cache.cc; GLIBC_TUNABLES: huge pages, freed heap '
                    'kept).')
  flags.DEFINE_string('coordinator_address', '', 'host:port of process 0, for multi-host runs.')
  flags.DEFINE_integer('num_processes', 1, 'Processes (hosts) in a multi-host run; -1 = '
                       'detect them (TPU pods, SLURM).')
  flags.DEFINE_integer('process_id', 0, "This process's index in a multi-host run.")
  flags.DEFINE_integer('cpu_devices', 0, 'Split the CPU into this many XLA devices, the batch '
                       'split over them (one per core is fastest: README, Performance); 0 = '
                       'one device. CPU only.', lower_bound=0)
  flags.DEFINE_string('compilation_cache_dir', '~/.cache/snas_jax/xla',
                      'Persistent XLA compilation cache: a resumed or repeated run skips '
                      'compiling. Empty = off.')


def set_cpu_devices(count: int) -> None:
  """``count`` XLA CPU devices (0: leave XLA's default); before JAX starts its
  CPU backend. A count the user put in XLA_FLAGS wins."""
  if count:
    snas_jax.default_xla_flag('--xla_force_host_platform_device_count', count)


def enable_compilation_cache(path: str) -> None:
  if path:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def trim_heap_after_compiles(min_seconds: float = 1.0) -> None:
  """After every XLA compilation of at least ``min_seconds`` (or load from the
  persistent cache), hands the heap memory the compiler freed back to the OS
  (glibc's malloc_trim; elsewhere a no-op). glibc keeps it otherwise, and the
  step's temporaries come on top: the paper's search held 5.1 GB after its
  compile and peaked at 11.3 GB (README, Performance)."""
  try:
    malloc_trim = ctypes.CDLL('libc.so.6').malloc_trim
  except (OSError, AttributeError):
    return

  def listener(event, duration_secs, **_):
    if event == '/jax/core/compile/backend_compile_duration' and duration_secs >= min_seconds:
      malloc_trim(0)

  jax.monitoring.register_event_duration_secs_listener(listener)


@contextlib.contextmanager
def one_line_errors():
  """A user error exits with its one-line message instead of a traceback; a
  run stopped by SIGTERM / SIGINT (after saving) with its one line and status
  128 + the signal; Ctrl-C before the loop installed its handler with one line."""
  try:
    yield
  except USER_ERRORS as e:
    raise SystemExit(f'error: {e}') from None
  except trainer.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    raise SystemExit(e.code) from None
  except KeyboardInterrupt:
    print('interrupted before the first step (nothing to save)', file=sys.stderr, flush=True)
    raise SystemExit(130) from None


def main(run_fn, config_cls, summary_fn=None) -> None:
  """Starts the runtime and calls ``run_fn(config, workdir)`` (or only
  ``summary_fn(config)`` under --summary: no workdir, no runtime)."""
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  with one_line_errors():
    cfg = config_lib.from_flags(config_cls)
    if summary_fn is not None and FLAGS.summary:
      summary_fn(cfg)
      return
    if not FLAGS.workdir:
      raise ValueError('--workdir is required: the folder for checkpoints and outputs')
    if FLAGS.tune_memory:
      restart_with_memory_tuning()
    set_cpu_devices(FLAGS.cpu_devices)
    enable_compilation_cache(FLAGS.compilation_cache_dir)
    trim_heap_after_compiles()
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
    run_fn(cfg, FLAGS.workdir)
