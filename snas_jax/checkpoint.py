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
"""
from __future__ import annotations

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

  def __init__(self, workdir: str, max_to_keep: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    _quiet_background_errors()
    # A save cut short (kill -9) leaves a tmp folder: removed on start.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only,
                                           cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'meta'))
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
    step = self._step(step)
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


def abstract_like(tree, sharding=None):
  """ShapeDtypeStructs of ``tree`` (for restore), optionally with a sharding."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=sharding or getattr(x, 'sharding', None)),
                      tree)
