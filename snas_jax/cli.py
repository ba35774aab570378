"""What every entry script shares: runtime flags, start-up, one-line errors.

An entry script (snas_jax.scripts) defines its config's flags and these, then
runs ``cli.main(run_fn, ConfigClass)`` under absl's ``app.run``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

# TensorFlow (tf.data, TensorBoard) is chatty at start-up; keep its warnings only.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402

from snas_jax import backends  # noqa: E402
from snas_jax import config as config_lib  # noqa: E402
from snas_jax import parallel  # noqa: E402
from snas_jax import loop  # noqa: E402

FLAGS = flags.FLAGS


# Errors a user can fix from the command line: printed as one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def define_runtime_flags(summary: bool = False) -> None:
  """The flags every script has; ``summary`` adds --summary (sizes only)."""
  if summary:
    flags.DEFINE_bool('summary', False, 'Print the parameters (M, auxiliary head excluded) and '
                      'multiply-adds (M) per image of the network, then exit (no --workdir needed).')
  flags.DEFINE_string('workdir', '', 'Folder for checkpoints and outputs (resumes if it holds one).')
  flags.DEFINE_bool('tune_memory', True, 'CPU backend only: restart once so that XLA\'s per-step '
                    'temporaries stay mapped between steps and sit on transparent huge pages '
                    '(LD_PRELOAD of the backend\'s block cache; GLIBC_TUNABLES: huge pages, '
                    'freed heap kept).')
  flags.DEFINE_string('coordinator_address', '', 'host:port of process 0, for multi-host runs.')
  flags.DEFINE_integer('num_processes', 1, 'Processes (hosts) in a multi-host run; -1 = '
                       'detect them (TPU pods, SLURM).')
  flags.DEFINE_integer('process_id', 0, "This process's index in a multi-host run.")
  flags.DEFINE_integer('cpu_devices', 0, 'CPU backend only: split the CPU into this many XLA '
                       'devices, the batch split over them; 0 = the backend\'s choice (darts: '
                       'one device; nb201: one per core, docs/cpu_backend.md).', lower_bound=0)
  flags.DEFINE_string('compilation_cache_dir', '~/.cache/snas_jax/xla',
                      'Persistent XLA compilation cache: a resumed or repeated run skips '
                      'compiling. Empty = off.')


def enable_compilation_cache(path: str) -> None:
  if path:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def start_backend(cfg) -> str:
  """Resolves --backend (for --dtype) before JAX starts and applies the CPU
  backend's process settings where it runs (they are read when JAX starts its
  CPU client; memory tuning restarts the script once), --cpu_devices=0 as
  ``process.default_devices`` for the run's space and batches. Returns the
  backend's name."""
  resolved = backends.resolve(cfg.backend, dtype=cfg.dtype)
  if resolved == 'cpu':
    from snas_jax.backends.cpu import process
    batches = [cfg.batch_size, getattr(cfg, 'eval_batch_size', cfg.batch_size)]  # train: one
    devices = FLAGS.cpu_devices or process.default_devices(
        cfg.space, batches, processes=FLAGS.num_processes)
    process.configure(FLAGS.tune_memory, devices)
    if devices > 1 and not FLAGS.cpu_devices:
      print(f'CPU backend: the batch split over {devices} XLA devices, one per core '
            f'(--cpu_devices=1: one device)', flush=True)
  elif FLAGS.cpu_devices:
    raise ValueError('--cpu_devices splits the CPU for --backend=cpu; with the reference backend '
                     'set XLA_FLAGS=--xla_force_host_platform_device_count=N instead')
  return resolved


@contextlib.contextmanager
def one_line_errors():
  """A user error exits with its one-line message instead of a traceback; a
  run stopped by SIGTERM / SIGINT (after saving) with its one line and status
  128 + the signal; Ctrl-C before the loop installed its handler with one line."""
  try:
    yield
  except USER_ERRORS as e:
    raise SystemExit(f'error: {e}') from None
  except loop.Interrupted as e:
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
    cfg = dataclasses.replace(cfg, backend=start_backend(cfg))
    enable_compilation_cache(FLAGS.compilation_cache_dir)
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
    run_fn(cfg, FLAGS.workdir)
