"""Every Orbax call of the project, behind save / restore / latest_step.

A checkpoint holds two items: ``state`` (a pytree of arrays: parameters, BN
statistics, α, optimiser states, step, RNG key, running epoch sums) and
``meta`` (JSON: the configuration, epoch, position in the data order,
metrics so far). Keeping Orbax here means a move to its newer API stays local.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (absent, or from another configuration)."""


class Checkpointer:
  """Saves and restores (state, meta) pairs under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    """Saves asynchronously (arrays are copied before this returns); a second
    save at the same step replaces the first (e.g. mid-epoch, then epoch end)."""
    if step in self._manager.all_steps():
      self._manager.wait_until_finished()
      self._manager.delete(step)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, sharding=None):
  """ShapeDtypeStructs of ``tree`` (for restore), optionally with a sharding."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=sharding or getattr(x, 'sharding', None)),
                      tree)
