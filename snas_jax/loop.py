"""The run protocol that the search (search.py) and the retraining (train.py)
share: ``run(task, workdir)`` opens or resumes a workdir, runs the epochs and
their steps, saves, stops on signals and --stop_after_step, evaluates,
records and writes the outputs. A ``Task`` says what is trained: its state,
step, batches, evaluations, record fields and outputs.

Read top to bottom: Learning rates, Non-finite guard, Resume, Evals, Files,
Stops, Task, Run. The guarantees (docs/faults.md):

- a workdir has one owner: process 0 holds an fcntl lock on ``<workdir>/.lock``
  for the whole run; a second run exits at once with one line naming the
  holder; the kernel frees the lock when its process ends, kill -9 included;
- a step whose loss, parameters, optimiser state or BN statistics are not
  finite stops the run with its step number and is never saved (checked one
  step late, so the host never waits for the device between steps);
- a failed checkpoint save stops the run with one line (checkpoint.py
  confirms each save before the next); an unreadable checkpoint is set aside
  and the run resumes from the newest readable one;
- a resume must keep every flag that changes shapes or results, except the
  learning rates, whose changes are recorded in the checkpoint's metadata;
- SIGTERM and SIGINT save a checkpoint at the next step boundary and stop
  with one line saying how to resume; a second signal exits at once;
- files are written whole or not at all, and a rerun of a finished workdir
  rebuilds any missing output from its checkpoint before saying it is done.
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
import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from snas_jax import checkpoint, reporting

# The metadata format of the checkpoints this code writes and resumes.
META_FORMAT = 2

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


# ----------------------------------------------------------------------------
# Task: what the loop trains. The search and the retraining each subclass it.


class Task:
  """One kind of run. Attributes the loop reads:

  ``name`` ('search', 'training run': the messages), ``config`` (the flags
  as a dict, saved in every checkpoint), ``lr_fields`` (flags a resume may
  change and records), ``lr_flags`` (the flags a non-finite error advises
  lowering), ``epochs``, ``steps_per_epoch``, ``checkpoint_every_steps``
  (0: epoch ends only), ``stop_after_step`` (0: none), ``progress`` (show a
  bar), ``eval_losses`` ({key of evaluate's result: its name in a
  non-finite error}).
  """
  name: str
  config: dict
  lr_fields: frozenset
  lr_flags: str
  epochs: int
  steps_per_epoch: int
  checkpoint_every_steps: int
  stop_after_step: int = 0
  progress: bool = True
  eval_losses: dict

  def abstract_state(self):
    """ShapeDtypeStructs of the state, with their shardings (for restoring)."""
    raise NotImplementedError

  def init_state(self):
    raise NotImplementedError

  def meta_fields(self) -> dict:
    """Task fields of the checkpoint's metadata, set on every run (e.g. the genotype)."""
    return {}

  def check_meta(self, meta: dict, workdir: str) -> None:
    """One-line CheckpointError if ``meta`` comes from another configuration
    (check_resume_config: the flags a resume may change)."""
    raise NotImplementedError

  def epoch_inputs(self, epoch: int) -> tuple:
    """The step's arguments after (state, batch) in ``epoch`` (e.g. τ, a drop rate)."""
    return ()

  def batches(self, epoch: int, start: int) -> Iterable:
    """The global batches of ``epoch`` from its step ``start`` on."""
    raise NotImplementedError

  def train_step(self, state, batch, *inputs):
    """(state, metrics): device scalars, 'loss' and 'finite' (the update is finite) among them."""
    raise NotImplementedError

  def evaluate(self, state, epoch: int, stops: 'StopRequests') -> dict:
    """The epoch end's evaluations (Python floats); raises EvalStopped on a stop request."""
    raise NotImplementedError

  def record(self, epoch: int, train: dict, evals: dict, epoch_time: float,
             steps_run: int) -> dict:
    """The epoch's record: ``train`` holds the means of the step metrics."""
    raise NotImplementedError

  def epoch_line(self, epoch: int, record: dict) -> str:
    raise NotImplementedError

  def finish(self, state) -> dict:
    """Metadata of the finished run, saved with its last checkpoint (e.g. the hand-off)."""
    return {}

  def outputs(self) -> list:
    """The files (names in the workdir) a finished run leaves."""
    raise NotImplementedError

  def write_outputs(self, workdir: str, state, meta: dict) -> None:
    """Writes every output from the final state and metadata, each atomically (process 0)."""
    raise NotImplementedError

  def final_line(self, workdir: str, meta: dict) -> str:
    raise NotImplementedError


# ----------------------------------------------------------------------------
# Run: the protocol.


class Result(NamedTuple):
  state: Any
  meta: dict
  stopped_at: int | None  # the step of --stop_after_step, or None at the end


def new_meta(task: Task) -> dict:
  """The metadata of a run before its first step (the one schema of every checkpoint)."""
  return {'format': META_FORMAT, 'config': dict(task.config), 'device_count': jax.device_count(),
          'epoch': 0, 'step_in_epoch': 0, 'epoch_sums': {}, 'elapsed_s': 0.0, 'records': [],
          'finished': False, **task.meta_fields()}


def check_meta(task: Task, meta: dict, workdir: str) -> None:
  """One-line CheckpointError for a checkpoint of another format or configuration."""
  if meta.get('format') != META_FORMAT:
    raise checkpoint.CheckpointError(
        f'{workdir} holds a {task.name} written by an earlier version of snas_jax (checkpoint '
        f'metadata format {meta.get("format", 1)}, this version reads {META_FORMAT}); finish it '
        f'with that version, or use a new --workdir')
  task.check_meta(meta, workdir)


def run(task: Task, workdir: str) -> Result:
  """Runs ``task`` in ``workdir`` from its newest readable checkpoint (or from
  the start) to the end or --stop_after_step, then writes its outputs.

  SIGTERM / SIGINT save at the next step boundary and raise Interrupted; a
  non-finite step raises NonFiniteError and a failed save
  checkpoint.CheckpointSaveError, neither saving anything. Every exit
  finishes the save in flight, closes the checkpointer and frees the workdir.
  """
  is_writer = jax.process_index() == 0
  with make_workdir(workdir), StopRequests() as stops:
    ckpt = checkpoint.Checkpointer(workdir)
    writer = None
    try:
      restored = ckpt.restore_latest(task.abstract_state(),
                                     lambda meta: check_meta(task, meta, workdir))
      if restored is None:
        state, meta = task.init_state(), new_meta(task)
      else:
        state, meta = restored
        if not meta['finished'] and is_writer:
          print(f'resuming {workdir} from step {int(state.step)}', flush=True)
        record_resume(meta, task.config, task.lr_fields, int(state.step), workdir)
        meta.update(task.meta_fields())
      already = meta['finished']
      if not already:
        writer = reporting.MetricsWriter(workdir, resume_step=int(state.step))
        state, stopped_at = _epochs(task, state, meta, ckpt, writer, stops, workdir)
        if stopped_at is not None:
          if is_writer:
            print(f'stopped after step {stopped_at} as asked (--stop_after_step); rerun to '
                  f'resume', flush=True)
          return Result(state, meta, stopped_at)
    finally:
      if writer is not None:
        writer.close()
      ckpt.close()
    # "Finished" is in the last checkpoint before the outputs exist: a rerun
    # writes any that a kill left missing (each is written whole or not at all).
    missing = [f for f in task.outputs() if not os.path.exists(os.path.join(workdir, f))]
    if is_writer and (missing or not already):
      task.write_outputs(workdir, state, meta)
  if is_writer:
    if already:
      rebuilt = f' ({len(missing)} rebuilt from its checkpoint)' if missing else ''
      print(f'{task.name} in {workdir} already finished; outputs are in place{rebuilt}',
            flush=True)
    else:
      print(task.final_line(workdir, meta), flush=True)
  return Result(state, meta, None)


def _epochs(task: Task, state, meta: dict, ckpt, writer, stops: StopRequests, workdir: str):
  """Runs the remaining epochs, updating ``meta``: (state, the step it stopped
  at by --stop_after_step or None at the end).

  Saves every --checkpoint_every_steps, at each epoch end (after its
  evaluation) and at a stop request (then raises Interrupted). A step's
  metrics are read one step late, when the next step is already queued: the
  device never waits for the host. Every save and stop checks them first.
  """
  n_steps = task.steps_per_epoch
  elapsed_before, t_start = meta['elapsed_s'], time.perf_counter()
  last_saved = ckpt.latest_step()
  is_writer = jax.process_index() == 0

  def save(step: int) -> None:
    nonlocal last_saved
    meta['elapsed_s'] = elapsed_before + time.perf_counter() - t_start
    ckpt.save(step, state, meta)
    last_saved = step

  for epoch in range(meta['epoch'], task.epochs):  # meta['epoch']: epochs fully done
    start = meta['step_in_epoch'] if epoch == meta['epoch'] else 0
    sums = dict(meta['epoch_sums']) if start else {}
    inputs = task.epoch_inputs(epoch)
    bar = reporting.ProgressBar(n_steps, desc=f'epoch {epoch + 1}/{task.epochs}',
                                enabled=task.progress and is_writer)
    bar.update(start)
    epoch_t0, pending = time.perf_counter(), None

    def check_pending() -> None:
      """Adds the last step's metrics to the sums once they are finite."""
      nonlocal pending
      if pending is not None:
        metrics, step = pending
        pending = None
        loss = checked_loss(metrics, step, epoch, last_saved, task.lr_flags)
        for key, value in metrics.items():
          if key != 'finite':
            sums[key] = sums.get(key, 0.0) + (loss if key == 'loss' else float(value))
        bar.update(1, loss=loss)

    def save_position(step: int, step_in_epoch: int) -> None:
      check_pending()  # never save a diverged state
      meta.update(epoch=epoch, step_in_epoch=step_in_epoch, epoch_sums=dict(sums))
      save(step)

    try:  # the bar is closed before any error line
      step = epoch * n_steps + start
      for i, batch in enumerate(task.batches(epoch, start), start=start):
        state, metrics = task.train_step(state, batch, *inputs)
        step = epoch * n_steps + i + 1
        check_pending()
        pending = (metrics, step)
        ckpt.confirm()  # a failed background save stops the run here
        if stops.should_stop():
          save_position(step, i + 1)
          ckpt.wait()
          raise stops.interrupted(step, workdir)
        stop = step == task.stop_after_step
        periodic = task.checkpoint_every_steps and step % task.checkpoint_every_steps == 0
        if (stop or periodic) and i + 1 < n_steps:  # the epoch end saves after its evaluation
          save_position(step, i + 1)
          if stop:
            ckpt.wait()
            return state, step
      check_pending()
    finally:
      bar.close()
    epoch_time = time.perf_counter() - epoch_t0
    try:
      evals = task.evaluate(state, epoch, stops)
    except EvalStopped:  # the resumed run evaluates again
      save_position(step, n_steps)
      ckpt.wait()
      raise stops.interrupted(step, workdir) from None
    step = (epoch + 1) * n_steps
    check_eval_loss({name: evals[key] for key, name in task.eval_losses.items()}, step, epoch,
                    last_saved, task.lr_flags)
    train = {key: value / n_steps for key, value in sums.items()}
    record = {'epoch': epoch + 1, 'step': step,
              **task.record(epoch, train, evals, epoch_time, n_steps - start)}
    writer.write(step, record, epoch=epoch + 1)
    writer.flush()
    if is_writer:
      print(task.epoch_line(epoch, record), flush=True)
    meta.update(epoch=epoch + 1, step_in_epoch=0, epoch_sums={},
                records=meta['records'] + [record])
    if epoch + 1 == task.epochs:
      meta.update(task.finish(state), finished=True)
    save(step)
    if meta['finished']:
      break
    if step == task.stop_after_step:
      ckpt.wait()
      return state, step
    if stops.should_stop():
      ckpt.wait()
      raise stops.interrupted(step, workdir)
  return state, None
