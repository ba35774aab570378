"""The run protocol of snas_jax.loop once, with a toy task (one float weight
fitted to a stream of numbers: no network to compile): records, outputs,
--stop_after_step and exact resume, the non-finite guard one step late, the
workdir's lock, a finished rerun, old checkpoint metadata."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from snas_jax import checkpoint, loop, reporting


@struct.dataclass
class ToyState:
  step: jax.Array
  w: jax.Array


@jax.jit
def _toy_step(state, x, lr):
  loss = (state.w - x) ** 2
  w = state.w - lr * 2 * (state.w - x)
  return state.replace(step=state.step + 1, w=w), {
      'loss': loss, 'finite': loop.all_finite(loss, w)}


class ToyTask(loop.Task):
  name = 'toy run'
  lr_fields = frozenset({'lr'})
  lr_flags = '--lr'
  eval_losses = {'eval_loss': 'eval loss'}
  epochs, steps_per_epoch, checkpoint_every_steps, progress = 3, 4, 2, False

  def __init__(self, stop_after_step=0, lr=0.1, poison_step=None):
    self.stop_after_step, self.poison_step = stop_after_step, poison_step
    self.config = {'lr': lr, 'stop_after_step': stop_after_step}
    self.steps_run = 0

  def abstract_state(self):
    return checkpoint.abstract_like(self.init_state())

  def check_meta(self, meta, workdir):
    loop.check_resume_config(meta['config'], self.config, {'lr', 'stop_after_step'}, workdir,
                             self.name)

  def init_state(self):
    return ToyState(step=jnp.zeros((), jnp.int32), w=jnp.zeros(()))

  def epoch_inputs(self, epoch):
    return (jnp.float32(self.config['lr'] / (epoch + 1)),)

  def batches(self, epoch, start):
    for i in range(start, self.steps_per_epoch):
      step = epoch * self.steps_per_epoch + i + 1
      yield jnp.float32(np.inf if step == self.poison_step else (step % 5) - 1.5)

  def train_step(self, state, x, lr):
    self.steps_run += 1
    return _toy_step(state, x, lr)

  def evaluate(self, state, epoch, stops):
    return {'eval_loss': float(state.w ** 2)}

  def record(self, epoch, train, evals, epoch_time, steps_run):
    return {'train_loss': train['loss'], **evals, 'epoch_time_s': epoch_time}

  def epoch_line(self, epoch, record):
    return f'epoch {epoch + 1}: eval loss {record["eval_loss"]:.4f}'

  def finish(self, state):
    return {'final_w': float(state.w)}

  def outputs(self):
    return ['final.json']

  def write_outputs(self, workdir, state, meta):
    loop.write_json(os.path.join(workdir, 'final.json'), {'w': float(state.w)})

  def final_line(self, workdir, meta):
    return f'toy finished: w {meta["final_w"]}'


def _records(workdir):
  return [{k: v for k, v in r.items() if k != 'epoch_time_s'} for r in reporting.read_metrics(workdir)]


def test_protocol_stop_resume_rebuild(tmp_path, capsys):
  full = loop.run(ToyTask(), str(tmp_path / 'full'))
  assert full.stopped_at is None and full.meta['finished'] and int(full.state.step) == 12
  records = _records(tmp_path / 'full')
  assert [(r['step'], r['epoch']) for r in records] == [(4, 1), (8, 2), (12, 3)]
  # The train loss is the mean of the epoch's step losses: x = -0.5, 0.5, 1.5, 2.5,
  # w = 0, -0.1, 0.02, 0.316 before each step (w -= 0.1 * 2 (w - x)).
  assert records[0]['train_loss'] == pytest.approx(np.mean([0.25, 0.36, 2.1904, 4.769856]),
                                                   rel=1e-6)
  assert json.loads((tmp_path / 'full' / 'final.json').read_text()) == {'w': float(full.state.w)}
  assert capsys.readouterr().out.splitlines()[-1] == f'toy finished: w {float(full.state.w)}'

  # --stop_after_step mid-epoch, then resumed: the same run, bit for bit.
  workdir = str(tmp_path / 'stopped')
  stopped = loop.run(ToyTask(stop_after_step=5), workdir)
  assert stopped.stopped_at == 5 and not (tmp_path / 'stopped' / 'final.json').exists()
  assert checkpoint.Checkpointer(workdir, read_only=True).latest_step() == 5
  resumed = loop.run(ToyTask(), workdir)
  assert resumed.state.w.tobytes() == full.state.w.tobytes()
  assert _records(workdir) == records
  assert 'resuming' in capsys.readouterr().out

  # A finished workdir: nothing runs; a missing output is rebuilt first.
  os.remove(tmp_path / 'stopped' / 'final.json')
  task = ToyTask()
  again = loop.run(task, workdir)
  assert task.steps_run == 0 and again.state.w.tobytes() == full.state.w.tobytes()
  assert capsys.readouterr().out.strip() == (f'toy run in {workdir} already finished; outputs are '
                                             f'in place (1 rebuilt from its checkpoint)')
  assert json.loads((tmp_path / 'stopped' / 'final.json').read_text()) == {'w': float(full.state.w)}


def test_non_finite_step_is_caught_one_step_late_and_never_saved(tmp_path):
  task = ToyTask(poison_step=7)
  with pytest.raises(loop.NonFiniteError, match=r'^loss is inf at step 7 \(epoch 2\); nothing of '
                     r'it is saved and the checkpoint at step 6 is kept: rerun the same command '
                     r'with a lower --lr'):
    loop.run(task, str(tmp_path))
  # Step 8 was queued before step 7 was read: the host never waited on the device.
  assert task.steps_run == 8
  assert checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step() == 6


def test_a_held_workdir_is_refused_in_one_line_and_untouched(tmp_path):
  holder = loop.WorkdirLock(str(tmp_path))
  holder.acquire()
  try:
    with pytest.raises(loop.WorkdirBusy) as err:
      loop.run(ToyTask(), str(tmp_path))
  finally:
    holder.release()
  assert str(err.value) == (f'--workdir={tmp_path} is in use by the run of pid {os.getpid()} on '
                            f'{os.uname().nodename}: wait for that run to end (or stop it), or '
                            f'use another --workdir')
  assert os.listdir(tmp_path) == [loop.LOCK_FILE]
  assert loop.run(ToyTask(), str(tmp_path)).meta['finished']  # released: the next run owns it


def test_checkpoint_of_an_older_format_is_refused_in_one_line(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(2, ToyTask().init_state(), {'config': ToyTask().config, 'epoch': 0})
  ckpt.close()
  with pytest.raises(checkpoint.CheckpointError, match=r'written by an earlier version of snas_jax '
                     r'\(checkpoint metadata format 1, this version reads 2\); finish it with '
                     r'that version, or use a new --workdir'):
    loop.run(ToyTask(), str(tmp_path))
