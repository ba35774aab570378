"""Every Orbax call of the project, behind save / restore / latest_step.

A checkpoint holds two items: ``state`` (a pytree of arrays: parameters, BN
statistics, α, optimiser states, step, RNG key, running epoch sums) and
``meta`` (JSON: the configuration, epoch, position in the data order,
metrics so far). Keeping Orbax here means a move to its newer API stays local.

Saves run in the background, and each is confirmed: ``confirm`` (cheap, at
every step boundary) surfaces a finished save's failure, and the next ``save``
waits for the previous one. A failed save raises CheckpointSaveError: one line
naming the folder and the cause, the previous checkpoint left as it was.
Orbax's own error logs (tracebacks from its threads) are dropped; the error
reaches the caller instead.

Three checkpoints are kept, so that two complete ones remain while the newest
is written or rewritten. ``restore_latest`` resumes from the newest one that
reads cleanly: one that cannot be read (a truncated or missing file,
unreadable metadata) is renamed ``<step>.damaged`` (never deleted) with a
one-line warning; one that reads but holds another tree or shapes stops the
run with one line.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import logging
import os
import re
import shutil
import sys
import warnings

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
TMP_SUFFIX = '.orbax-checkpoint-tmp'
DAMAGED_SUFFIX = '.damaged'


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (absent, or from another configuration)."""


class CheckpointSaveError(CheckpointError):
  """A save failed (disk full, permissions); the previous checkpoint is intact."""


class _DropOrbaxErrors(logging.Filter):
  """Orbax logs a background save's failure with tracebacks from each of its
  threads; Checkpointer raises it as one line instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname)


class _DropOrphanedWrites(logging.Filter):
  """The other writes of a failed save end with the same error, which asyncio
  logs ("exception was never retrieved") when they are collected."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ('never retrieved' in message and ('orbax' in message or 'OCDBT' in message))


# After a write fails, TensorStore completes the other writes of that save on
# an asyncio loop Orbax has closed; each callback's RuntimeError would print
# as an "unraisable" traceback. Those (and only those) are dropped.
_ORPHANED_CALLBACK_ERRORS = ('Event loop is closed', 'cannot schedule new futures after shutdown')
_quieted = False


def _quiet_background_errors() -> None:
  """Installs the filters above (once, when the first Checkpointer is made, so
  that importing the module changes nothing)."""
  global _quieted
  if _quieted:
    return
  _quieted = True
  logging.getLogger('absl').addFilter(_DropOrbaxErrors())
  logging.getLogger('asyncio').addFilter(_DropOrphanedWrites())
  previous_hook = sys.unraisablehook

  def drop_orphaned_callbacks(unraisable) -> None:
    if not (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) in _ORPHANED_CALLBACK_ERRORS):
      previous_hook(unraisable)

  sys.unraisablehook = drop_orphaned_callbacks


def _cause(error: BaseException) -> str:
  """The OS-level cause of a failed write in a few words ('No space left on device')."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return f'{seen.strerror} [Errno {seen.errno}]'
    seen = seen.__cause__ or seen.__context__
  code = re.search(r"os_error_code='?(\d+)", str(error))
  if code:
    return f'{os.strerror(int(code.group(1)))} [Errno {code.group(1)}]'
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text[:200]}' if text else type(error).__name__


class Checkpointer:
  """Saves and restores (state, meta) pairs under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    _quiet_background_errors()
    # A save cut short (kill -9) leaves a tmp folder: removed on start.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only,
                                           cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    self._pending = None  # the step of a save not yet confirmed
    self._failed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    """Saves asynchronously (arrays are copied before this returns) once the
    previous save is confirmed; a second save at the same step replaces the
    first (e.g. mid-epoch, then epoch end)."""
    self.wait()
    try:
      if step in self._manager.all_steps():
        self._manager.delete(step)
      self._pending = step
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)

  def confirm(self) -> None:
    """Confirms the last save if it has finished (never blocks); raises
    CheckpointSaveError if it failed."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the last save is written; raises CheckpointSaveError if it failed."""
    if self._pending is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)
    self._pending = None

  def _fail(self, error: BaseException):
    step, self._pending, self._failed = self._pending, None, True
    # The failed save's other writes are dropped unawaited: no warning at exit.
    warnings.filterwarnings('ignore', message="coroutine '.*' was never awaited",
                            category=RuntimeWarning)
    self._remove_tmp()
    kept = self._manager.latest_step()
    kept = (f'the checkpoint at step {kept} is kept' if kept is not None
            else 'no earlier checkpoint exists')
    raise CheckpointSaveError(
        f'saving the checkpoint of step {step} to {self.directory} failed ({_cause(error)}); '
        f'{kept}: free space or fix permissions, then rerun the same command') from None

  def _remove_tmp(self):
    for path in glob.glob(os.path.join(self.directory, f'*{TMP_SUFFIX}*')):
      shutil.rmtree(path, ignore_errors=True)

  def restore_meta(self, step: int | None = None) -> dict:
    """The metadata at ``step``; by default the newest that reads (a damaged
    one is passed over here and set aside by the next run's restore_latest)."""
    if step is not None:
      return self._read_meta(step)
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self._read_meta(step)
      except Exception:  # pylint: disable=broad-except
        continue
    raise CheckpointError(f'no readable checkpoint in {self.directory}')

  def _read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta) at ``step`` (default: latest); ``abstract_state`` gives the
    tree, shapes and shardings (``jax.eval_shape`` of the init, sharded)."""
    step = self._step(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except ValueError as e:  # Orbax: another tree or shape; its message spans lines
      cause = ' '.join(str(e).split())
      raise CheckpointError(
          f'the checkpoint at step {step} in {self.directory} does not fit this network '
          f'(written by another configuration or version of snas_jax?); start a new --workdir. '
          f'Orbax: {cause[:300]}') from e
    return restored['state'], restored['meta']

  def restore_latest(self, abstract_state, check_meta=None):
    """(state, meta) of the newest checkpoint that reads cleanly, or None if
    there is none. ``check_meta(meta)`` runs first on its metadata (e.g. a
    one-line CheckpointError for another configuration). A checkpoint that
    cannot be read is set aside (``<step>.damaged``) with a one-line warning
    and the next older one is tried; one that reads but does not fit
    ``abstract_state`` raises CheckpointError."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      with _quiet_failed_reads():
        try:
          meta = self._read_meta(step)
          stored = self._manager.item_metadata(step)['state']
          if stored is None:
            raise FileNotFoundError('no array metadata')
        except Exception as e:  # pylint: disable=broad-except
          self._set_aside(step, e)
          continue
        if check_meta is not None:
          check_meta(meta)
        self._check_fits(step, stored.tree, abstract_state)
        try:
          restored = self._manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:  # pylint: disable=broad-except
          self._set_aside(step, e)
          continue
      return restored['state'], meta
    return None

  def _check_fits(self, step: int, stored_tree, abstract_state) -> None:
    """One-line CheckpointError unless the stored arrays have the paths,
    shapes and dtypes of ``abstract_state``."""
    stored, wanted = _leaf_specs(stored_tree), _leaf_specs(abstract_state)
    if stored == wanted:
      return
    differ = sorted(set(stored) ^ set(wanted)) or sorted(
        p for p in wanted if stored[p] != wanted[p])
    first = differ[0]
    raise CheckpointError(
        f'the checkpoint at step {step} in {self.directory} does not fit this network '
        f'({len(differ)} arrays differ, e.g. {first}: {stored.get(first, "absent")} there, '
        f'{wanted.get(first, "absent")} now; written by another configuration or version of '
        f'snas_jax?); start a new --workdir')

  def _set_aside(self, step: int, error: BaseException) -> None:
    """Renames an unreadable checkpoint to ``<step>.damaged`` (process 0) and warns."""
    source = os.path.join(self.directory, str(step))
    target = source + DAMAGED_SUFFIX
    n = 1
    while os.path.exists(target):
      target, n = f'{source}{DAMAGED_SUFFIX}.{n}', n + 1
    if jax.process_index() == 0:
      os.rename(source, target)
      cause = re.split(r' See full| \[tensorstore_spec', _cause(error))[0][:160]
      print(f'warning: the checkpoint at step {step} cannot be read ({cause}); moved '
            f'to {target}; trying the previous checkpoint', file=sys.stderr, flush=True)
    self._manager.reload()

  def _step(self, step):
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    return step

  def close(self) -> None:
    """Waits for the last save and releases Orbax's threads. After a failed
    save (already raised) it only cleans up, so an error exit stays one line."""
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise
      if self._failed:
        self._remove_tmp()


def _leaf_specs(tree) -> dict:
  """{'a/b/0': 'float32[3, 4]'} over the array leaves of ``tree`` (a state, its
  ShapeDtypeStructs or Orbax's stored metadata: attribute, key and index paths alike)."""
  def name(entry):
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  return {'/'.join(name(e) for e in path): f'{jax.numpy.dtype(leaf.dtype).name}{list(leaf.shape)}'
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@contextlib.contextmanager
def _quiet_failed_reads():
  """A failed read leaves Orbax's other reads of that restore to fail unawaited;
  their 'Exception ignored in <coroutine>' reports are dropped (the caller
  reports the damage in one line)."""
  previous_hook = sys.unraisablehook

  def drop_orbax_coroutines(unraisable) -> None:
    if f'{os.sep}orbax{os.sep}' not in ''.join(
        str(getattr(getattr(unraisable.object, 'cr_code', None), 'co_filename', ''))):
      previous_hook(unraisable)

  sys.unraisablehook = drop_orbax_coroutines
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous_hook


def abstract_like(tree, sharding=None):
  """ShapeDtypeStructs of ``tree`` (for restore), optionally with a sharding."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=sharding or getattr(x, 'sharding', None)),
                      tree)
