"""What the search loop (search.py) and the retraining loop (train.py) share.

Read top to bottom: Learning rates, Non-finite guard, Resume, Evals, Files,
Stops. The guarantees they give together (docs/faults.md):

- a step whose loss, parameters, optimiser state or BN statistics are not
  finite stops the run with its step number and is never saved;
- a failed checkpoint save stops the run with one line (checkpoint.py
  confirms each save before the next);
- a resume must keep every flag that changes shapes or results, except the
  learning rates, whose changes are recorded in the checkpoint's metadata;
- SIGTERM and SIGINT save a checkpoint at the next step boundary and stop
  with one line saying how to resume; a second signal exits at once;
- files are written whole or not at all.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import sys
import threading
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from snas_jax import checkpoint, reporting

# ----------------------------------------------------------------------------
# Learning rates: optax schedules, evaluated at the epoch index (constant
# within an epoch, as PyTorch's per-epoch schedulers).


def cosine_per_epoch(init_value: float, final_value: float, epochs: int) -> optax.Schedule:
  """epoch -> final + (init - final)·(1 + cos(π·epoch/epochs))/2 (CosineAnnealingLR)."""
  return optax.cosine_decay_schedule(init_value, epochs, alpha=final_value / init_value)


def exponential_per_epoch(init_value: float, decay: float) -> optax.Schedule:
  """epoch -> init·decay^epoch (ExponentialLR stepped once per epoch)."""
  return optax.exponential_decay(init_value, transition_steps=1, decay_rate=decay, staircase=True)


def per_epoch(schedule: optax.Schedule, steps_per_epoch: int, epochs: int) -> optax.Schedule:
  """A schedule of the update count that holds ``schedule(epoch)`` through each epoch."""
  return lambda count: schedule(jnp.minimum(count // steps_per_epoch, epochs - 1))

# ----------------------------------------------------------------------------
# Non-finite guard: the step reports whether what it would commit is finite,
# the loop stops before anything of that step reaches a checkpoint.


def all_finite(*trees) -> jax.Array:
  """bool scalar: every floating-point leaf of ``trees`` is finite, inside the
  jitted step. One reduction over all leaves concatenated: a reduction per
  leaf made XLA:CPU compile ~2,400 more kernels for the paper's search step
  (compile 43 -> 28 s; the copy is ~20 MB a step)."""
  leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  if not leaves:
    return jnp.array(True)
  return jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in leaves])).all()


class NonFiniteError(FloatingPointError):
  """A step produced a non-finite loss or state; nothing of it was saved."""


def checked_loss(metrics: dict, step: int, epoch: int, last_saved: int | None,
                 lr_flags: str) -> float:
  """The step's loss as a float, or a one-line NonFiniteError naming the step
  when the loss or the updated state (``metrics['finite']``) is not finite."""
  loss = float(metrics['loss'])
  if math.isfinite(loss) and bool(metrics['finite']):
    return loss
  what = (f'loss is {loss}' if not math.isfinite(loss)
          else 'the update made parameters, optimiser state or BN statistics non-finite')
  raise NonFiniteError(f'{what} at step {step} (epoch {epoch + 1}); nothing of it is saved and '
                       + _advice(last_saved, lr_flags))


def check_eval_loss(losses: dict, step: int, epoch: int, last_saved: int | None,
                    lr_flags: str) -> None:
  """One-line NonFiniteError if an evaluation loss is not finite: the state of
  ``step`` is finite but overflows in a forward pass, so the epoch end is not saved."""
  bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
  if bad:
    raise NonFiniteError(
        f'the evaluation after step {step} (epoch {epoch + 1}) gives '
        f'{", ".join(f"{k} {v}" for k, v in bad.items())}; this state is not saved and '
        + _advice(last_saved, lr_flags))


def _advice(last_saved: int | None, lr_flags: str) -> str:
  """The end of a non-finite error: which checkpoint is kept, and what to do."""
  kept = (f'the checkpoint at step {last_saved} is kept' if last_saved is not None
          else 'no checkpoint was written yet')
  return (f'{kept}: rerun the same command with a lower {lr_flags} (a resume may change the '
          f'learning rates) or check the data')

# ----------------------------------------------------------------------------
# Resume: which flags a resumed run may change, and what it records.


def check_resume_config(saved: dict, current: dict, fixed_ok: Iterable[str],
                        workdir: str, what: str, extra_diffs: Iterable[str] = ()) -> None:
  """One-line CheckpointError if a flag outside ``fixed_ok`` (flags that may
  change on resume) differs between the checkpoint's config and this run's."""
  fixed_ok = set(fixed_ok)
  diffs = [f'--{k}={saved[k]!r} there, --{k}={current[k]!r} now' for k in sorted(current)
           if k not in fixed_ok and k in saved and saved[k] != current[k]]
  diffs += list(extra_diffs)
  if diffs:
    raise checkpoint.CheckpointError(
        f'{workdir} holds a {what} with another configuration ({"; ".join(diffs)}); '
        f'rerun with the same flags or use a new --workdir')


def record_resume(meta: dict, current: dict, recorded: Iterable[str], step: int,
                  workdir: str) -> None:
  """Updates ``meta`` for a resumed run: the flags of ``recorded`` (learning
  rates) that changed are noted in meta['resumes'] with the step they apply
  from and printed; meta['config'] becomes this run's. A change of the device
  count is allowed with a warning (results then differ in float rounding)."""
  saved = meta.get('config', {})
  changed = {k: [saved[k], current[k]] for k in sorted(recorded)
             if k in saved and saved[k] != current[k]}
  devices = jax.device_count()
  saved_devices = meta.get('device_count')
  if changed or (saved_devices is not None and saved_devices != devices):
    meta['resumes'] = meta.get('resumes', []) + [
        {'step': step, 'changed': changed, 'device_count': devices}]
  if changed and jax.process_index() == 0:
    print(f'resuming {workdir} at step {step} with ' + ', '.join(
        f'--{k}={new!r} (was {old!r})' for k, (old, new) in changed.items()), flush=True)
  if saved_devices is not None and saved_devices != devices and jax.process_index() == 0:
    print(f'warning: {workdir} ran on {saved_devices} device(s), this run has {devices}: '
          f'results are not bitwise identical across device counts (the per-step loss agrees '
          f'within float tolerance)', file=sys.stderr, flush=True)
  meta['config'] = dict(current)
  meta['device_count'] = devices

# ----------------------------------------------------------------------------
# Evals


class EvalStopped(Exception):
  """A stop was requested during an evaluation pass (it is abandoned)."""


def eval_sums(eval_fn: Callable[[int, dict], dict], batches: Iterable[dict],
              stops: 'StopRequests | None' = None) -> dict:
  """Sums ``eval_fn(i, batch)`` (dicts of device scalars) over ``batches`` into
  Python floats; raises EvalStopped between batches once a stop is requested."""
  sums = None
  for i, batch in enumerate(batches):
    if stops is not None and stops.should_stop():
      raise EvalStopped
    out = eval_fn(i, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return jax.tree.map(float, sums) if sums is not None else {}

# ----------------------------------------------------------------------------
# Files


def check_workdir(workdir: str) -> None:
  """One-line ValueError unless ``workdir`` is, or can be made, a writable
  folder. Creates nothing (called before any other work)."""
  if not workdir:
    raise ValueError('--workdir is required: the folder for checkpoints and outputs')
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'--workdir={workdir} is a file, not a folder; choose another --workdir')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f'--workdir={workdir} cannot be created: {existing} is a file')
  if os.statvfs(existing).f_flag & os.ST_RDONLY:
    raise ValueError(f'--workdir={workdir} cannot be written: {existing} is on a read-only '
                     f'file system')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir={workdir} cannot be written: {existing} is not writable '
                     f'(permissions)')


LOCK_FILE = '.lock'


class WorkdirBusy(ValueError):
  """Another run holds the workdir's lock."""


class WorkdirLock:
  """An exclusive lock on ``<workdir>/.lock`` (fcntl.flock), held by process 0
  for the whole run, with the holder's host and pid written in the file. The
  kernel drops it when the holder's process ends, however it ends (kill -9
  included), so a lock is never left stuck."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> None:
    """Takes the lock, or a one-line WorkdirBusy naming the holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors='replace').strip() or 'another process'
      os.close(fd)
      workdir = os.path.dirname(self.path)
      raise WorkdirBusy(f'--workdir={workdir} is in use by {holder}: wait for that run to end '
                        f'(or stop it), or use another --workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, f'the run of pid {os.getpid()} on {socket.gethostname()}\n'.encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # the file stays: removing it would race with a new holder
      self._fd = None



@contextlib.contextmanager
def make_workdir(workdir: str):
  """Creates ``workdir``, holds its lock (process 0) until the block ends and
  proves it writable (a probe file), else a one-line ValueError. Nothing in
  the workdir is touched before the lock is held."""
  check_workdir(workdir)
  lock = WorkdirLock(workdir)
  probe = os.path.join(workdir, f'.write_test.{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
      lock.acquire()
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    lock.release()
    raise ValueError(f'--workdir={workdir} cannot be written ({e.strerror})') from None
  try:
    yield
  finally:
    lock.release()


def write_json(path: str, value) -> None:
  """Writes ``value`` as JSON under ``path`` atomically (never a half-written file)."""
  reporting.write_atomic(path, lambda f: f.write(json.dumps(value, indent=1) + '\n'))

# ----------------------------------------------------------------------------
# Stops: SIGTERM (schedulers, preempted VMs) and SIGINT (Ctrl-C) ask the loop
# to save at the next step boundary and stop; a second one exits at once.


class Interrupted(Exception):
  """The run stopped on a signal after saving; ``code`` is the exit status (128 + signal)."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


class StopRequests:
  """Context manager that turns SIGTERM / SIGINT into a request the loop
  polls at step boundaries (``should_stop``). Handlers are installed only in
  the main thread and restored on exit."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}

  @property
  def requested(self) -> str | None:
    return signal.Signals(self.signum).name if self.signum is not None else None

  def should_stop(self) -> bool:
    """Whether to stop at this step boundary. On several hosts every process
    answers the same (a request on any host counts), so all save the same step."""
    if jax.process_count() == 1:
      return self.signum is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    signums = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0)))
    if self.signum is None and signums.max():
      self.signum = int(signums.max())
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # the second signal: no save, no cleanup
      print(f'{signal.Signals(signum).name} again: exiting now without saving; the last '
            f'saved checkpoint is kept', file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signum = signum
    print(f'{signal.Signals(signum).name}: saving a checkpoint at the next step boundary, '
          f'then stopping (send it again to exit at once)', file=sys.stderr, flush=True)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
    return False

  def interrupted(self, step: int, workdir: str) -> Interrupted:
    """The exception that ends the run once the checkpoint of ``step`` is saved."""
    return Interrupted(f'stopped by {self.requested} after step {step}; the checkpoint is saved in '
                       f'{workdir}: rerun the same command to resume', 128 + self.signum)

