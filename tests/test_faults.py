"""Faults lose nothing: kills, signals, failed saves, a damaged checkpoint, a
second run on the same workdir, non-finite steps and bad inputs.

The subprocess sequence runs once (each process start costs seconds): one
tiny search is stopped by SIGTERM during its first compile, by a failed
save, by SIGKILL during a compile and during the save after an evaluation;
its latest checkpoint is then damaged, a second run on its workdir is
refused while it runs, it is killed while it writes its outputs, and the
rerun must leave every output bitwise equal to the uninterrupted run of
conftest.tiny_search_workdir.
SIGINT is tested in-process on the retraining loop (the same helpers).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import DAMAGE, ROOT, damage_checkpoint, script_command, search_args
from snas_jax import checkpoint, cli, config as config_lib, reporting, search, train
from snas_jax.spaces.darts import genotypes
from snas_jax import loop

TIMING_KEYS = {'epoch_time_s', 'images_per_s'}
TIMEOUT = 300


# ----------------------------------------------------------------------------
# The subprocess sequence.


class Search:
  """The tiny search as a child process; its output lines are collected as they come."""

  def __init__(self, workdir, data_dir, wrapper=()):
    argv, env = script_command('search_cifar.py', *search_args(workdir, data_dir))
    self.proc = subprocess.Popen([*wrapper, *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    self.lines, self.err_lines = [], []
    self._readers = [threading.Thread(target=self._read, args=(f, out), daemon=True)
                     for f, out in ((self.proc.stdout, self.lines),
                                    (self.proc.stderr, self.err_lines))]
    for reader in self._readers:
      reader.start()
    self.t0 = time.time()

  @staticmethod
  def _read(stream, out):
    for line in stream:
      out.append(line.rstrip('\n'))

  @property
  def stderr(self):
    return '\n'.join(self.err_lines)

  def wait_for(self, predicate, what):
    """Polls ``predicate()`` every 2 ms until true; fails if the process ends first."""
    while not predicate():
      if self.proc.poll() is not None:
        self.finish()
        pytest.fail(f'the search ended (rc {self.proc.returncode}) before {what}: '
                    f'{self.stderr[-2000:]}')
      if time.time() - self.t0 > TIMEOUT:
        self.proc.kill()
        pytest.fail(f'timed out waiting for {what}')
      time.sleep(0.002)

  def printed(self, prefix):
    return lambda: any(line.startswith(prefix) for line in self.lines)

  def finish(self):
    rc = self.proc.wait(timeout=TIMEOUT)
    for reader in self._readers:
      reader.join(timeout=10)
    return rc

  def last_line(self):
    return self.stderr.strip().splitlines()[-1]


def _steps(workdir):
  folder = workdir / checkpoint.CHECKPOINT_DIR
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if folder.is_dir() else []


def _tmp_dirs(workdir):
  folder = workdir / checkpoint.CHECKPOINT_DIR
  return [n for n in os.listdir(folder) if checkpoint.TMP_SUFFIX in n] if folder.is_dir() else []


# Runs the command after it with files that may not grow past 32 KB (a
# checkpoint's arrays do, the metrics do not): a write fails (EFBIG) instead
# of killing the process. Both settings survive exec; no preexec_fn, which
# forks a multithreaded (JAX) parent.
LIMIT_FILE_SIZE = (sys.executable, '-c',
                   'import os, resource, signal, sys; '
                   'signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
                   'resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, resource.RLIM_INFINITY)); '
                   'os.execv(sys.argv[1], sys.argv[1:])')


def _snapshot(folder):
  """{path: (size, mtime)} of every file and folder under ``folder``."""
  out = {}
  for parent, dirs, files in os.walk(folder):
    for name in dirs + files:
      stat = os.stat(os.path.join(parent, name))
      out[os.path.join(parent, name)] = (stat.st_size, stat.st_mtime_ns)
  return out


def test_kills_signals_and_failed_saves_resume_bitwise(tiny_search_workdir, tmp_path, cifar_dir):
  workdir = tmp_path / 'faults'

  # SIGTERM during the first compile: a checkpoint at step 1 (the periodic
  # ones are at 2, 4, 6), one line that says how to resume, status 143.
  run = Search(workdir, cifar_dir)
  run.wait_for(lambda: (workdir / checkpoint.CHECKPOINT_DIR).is_dir(), 'the checkpointer')
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == 128 + signal.SIGTERM, run.stderr[-2000:]
  assert run.last_line().startswith('stopped by SIGTERM after step 1;')
  assert run.last_line().endswith('rerun the same command to resume')
  assert 'Traceback' not in run.stderr
  assert _steps(workdir) == [1] and not _tmp_dirs(workdir)
  assert not (workdir / 'genotype.json').exists()
  with pytest.raises(checkpoint.CheckpointError, match='unfinished search'):
    search.load_genotype(str(workdir))  # a retraining run refuses it

  # A save that fails (its files may not grow: EFBIG, as a full disk's
  # ENOSPC) stops the run with one line; step 1's checkpoint is intact.
  run = Search(workdir, cifar_dir, wrapper=LIMIT_FILE_SIZE)
  assert run.finish() == 1
  last = run.last_line()
  assert last.startswith('error: saving the checkpoint of step 2 to ') and 'File too large' in last
  assert 'the checkpoint at step 1 is kept' in last
  assert 'Traceback' not in run.stderr
  assert _steps(workdir) == [1] and not _tmp_dirs(workdir)

  # SIGKILL while the resumed run loads and compiles its step. The kill
  # frees the workdir's lock (its file still names the killed run).
  run = Search(workdir, cifar_dir)
  run.wait_for(run.printed('resuming'), 'the resume')
  run.proc.kill()
  run.finish()
  assert f'pid {run.proc.pid} ' in (workdir / loop.LOCK_FILE).read_text()

  # SIGKILL once the first epoch's evaluation is done: its metrics are
  # written, the epoch-end checkpoint is being saved.
  run = Search(workdir, cifar_dir)
  run.wait_for(run.printed('epoch 1:'), 'the first evaluation')
  run.proc.kill()
  run.finish()

  # A truncated file in the latest checkpoint (a disk fault, a copy cut
  # short): that checkpoint is set aside, the run resumes from the one before.
  steps = _steps(workdir)
  assert len(steps) >= 2, steps
  damage_checkpoint(workdir / checkpoint.CHECKPOINT_DIR / str(steps[-1]), 'truncated file')

  # A second run on the workdir while the first holds it (stopped, so that
  # nothing changes): refused in one line naming the holder; it touches nothing.
  run = Search(workdir, cifar_dir)
  run.wait_for(run.printed('resuming'), 'the resume')
  assert any(f'checkpoint at step {steps[-1]} cannot be read' in l for l in run.err_lines)
  assert _steps(workdir) == steps[:-1] and (workdir / checkpoint.CHECKPOINT_DIR
                                            / f'{steps[-1]}{checkpoint.DAMAGED_SUFFIX}').is_dir()
  run.proc.send_signal(signal.SIGSTOP)
  before = _snapshot(workdir)
  argv, env = script_command('search_cifar.py', *search_args(workdir, cifar_dir))
  second = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT)
  run.proc.send_signal(signal.SIGCONT)
  assert second.returncode == 1, second.stderr[-2000:]
  # It read its data (start-up checks), then stopped before anything else.
  assert all(line.startswith('CIFAR-10: ') for line in second.stdout.splitlines()), second.stdout
  assert second.stderr.strip() == (f'error: --workdir={workdir} is in use by the run of pid '
                                   f'{run.proc.pid} on {socket.gethostname()}: wait for that run '
                                   f'to end (or stop it), or use another --workdir')
  assert _snapshot(workdir) == before

  # SIGKILL while the finished run writes its report: the rerun rebuilds
  # what is missing before it says the search is finished.
  run.wait_for(lambda: (workdir / 'genotype.json').exists(), 'the report')
  run.proc.kill()
  assert run.finish() == -signal.SIGKILL
  assert not (workdir / 'summary.json').exists()
  run = Search(workdir, cifar_dir)
  assert run.finish() == 0, run.stderr[-3000:]
  assert run.lines[-1].startswith(f'search in {workdir} already finished; outputs are in place (')

  # Every output equals the uninterrupted run's, bit for bit.
  assert not _tmp_dirs(workdir)  # the killed save's tmp folder is gone
  for name in search.output_files():
    if name != 'summary.json':
      assert (workdir / name).read_bytes() == (tiny_search_workdir / name).read_bytes(), name
  strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]
  assert strip(reporting.read_metrics(workdir)) == strip(reporting.read_metrics(tiny_search_workdir))
  summary = lambda w: {k: v for k, v in json.loads((w / 'summary.json').read_text()).items()
                       if k not in ('elapsed_s', 'last_epoch')}
  assert summary(workdir) == summary(tiny_search_workdir)


@pytest.mark.parametrize('kind', DAMAGE)
def test_damaged_latest_checkpoint_is_set_aside(tmp_path, kind, capsys):
  tree = {'w': jax.numpy.arange(1000, dtype=np.float32), 'b': jax.numpy.ones((30, 30))}
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  for step in (1, 2):
    ckpt.save(step, jax.tree.map(lambda x: x * step, tree), {'epoch': step})
  ckpt.close()
  folder = tmp_path / checkpoint.CHECKPOINT_DIR
  damage_checkpoint(folder / '2', kind)
  # A reader (a retraining run's --search_workdir, a study's report) passes over it.
  if kind == 'garbage metadata':
    assert checkpoint.Checkpointer(str(tmp_path), read_only=True).restore_meta() == {'epoch': 1}
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state, meta = ckpt.restore_latest(checkpoint.abstract_like(tree))
  ckpt.close()
  assert meta == {'epoch': 1}
  for name in tree:
    np.testing.assert_array_equal(state[name], tree[name])
  assert sorted(os.listdir(folder)) == ['1', '2' + checkpoint.DAMAGED_SUFFIX]
  err = capsys.readouterr().err.strip()
  assert err.startswith('warning: the checkpoint at step 2 cannot be read (') and '\n' not in err
  assert err.endswith(f'moved to {folder / "2.damaged"}; trying the previous checkpoint')
  # The last one damaged too: nothing to resume from (the run starts over).
  damage_checkpoint(folder / '1', kind)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.restore_latest(checkpoint.abstract_like(tree)) is None
  ckpt.close()
  assert sorted(os.listdir(folder)) == ['1.damaged', '2.damaged']


# ----------------------------------------------------------------------------
# Non-finite steps, learning-rate changes on resume, device counts.


def test_all_finite_sees_every_float_leaf():
  tree = {'w': np.ones(3, np.float32), 'count': np.int32(7), 'stats': [np.zeros(2, np.float32)]}
  assert bool(jax.jit(loop.all_finite)(tree, np.float32(1.0)))
  for bad in (np.inf, -np.inf, np.nan):
    tree['stats'][0][1] = bad
    assert not bool(jax.jit(loop.all_finite)(tree, np.float32(1.0)))


def test_non_finite_message_names_the_step_and_the_flag():
  with pytest.raises(loop.NonFiniteError) as err:
    loop.checked_loss({'loss': np.float32(2.0), 'finite': np.bool_(False)}, 7, 0, 6,
                         '--w_lr / --alpha_lr')
  message = str(err.value)
  assert '\n' not in message and 'at step 7 (epoch 1)' in message
  assert 'the checkpoint at step 6 is kept' in message and '--w_lr / --alpha_lr' in message
  assert 'a resume may change the learning rates' in message
  assert loop.checked_loss({'loss': np.float32(2.0), 'finite': np.bool_(True)}, 7, 0, 6, '') == 2.0


def test_resume_records_learning_rate_and_device_count_changes(capsys):
  cfg = search.SearchConfig(w_lr=0.01)
  saved = dict(config_lib.to_dict(search.SearchConfig()))
  # Learning rates may change on resume; other result-changing flags may not.
  search.check_resume_config(saved, cfg, '/w')
  with pytest.raises(checkpoint.CheckpointError, match='--channels=16 there, --channels=8 now'):
    search.check_resume_config(saved, search.SearchConfig(channels=8), '/w')
  meta = {'config': saved, 'device_count': jax.device_count() + 1}
  loop.record_resume(meta, config_lib.to_dict(cfg), search.LR_FIELDS, 12, '/w')
  out, err = capsys.readouterr()
  assert out.strip() == 'resuming /w at step 12 with --w_lr=0.01 (was 0.025)'
  assert err.strip().startswith('warning: /w ran on ') and 'not bitwise identical' in err
  assert meta['resumes'] == [{'step': 12, 'changed': {'w_lr': [0.025, 0.01]},
                              'device_count': jax.device_count()}]
  assert meta['config']['w_lr'] == 0.01 and meta['device_count'] == jax.device_count()


# ----------------------------------------------------------------------------
# Bad inputs: one line, before any work.


def _one_line_exit(fn, *args):
  """The message cli prints for a run that fails with a user error."""
  with pytest.raises(SystemExit) as err:
    with cli.one_line_errors():
      fn(*args)
  message = str(err.value.code)
  assert message.startswith('error: ') and '\n' not in message, message
  return message


def _tiny_search(**overrides):
  return search.SearchConfig(**{**dict(channels=4, layers=3, image_size=8, backend='reference',
                                       data_dir='/nonexistent'), **overrides})


@pytest.mark.parametrize('case', ['parent is a file', 'is a file', 'read-only file system'])
def test_unwritable_workdir_is_one_line(tmp_path, monkeypatch, case):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  workdir = {'parent is a file': blocker / 'w', 'is a file': blocker,
             'read-only file system': tmp_path / 'ro' / 'w'}[case]
  if case == 'read-only file system':
    statvfs = os.statvfs
    monkeypatch.setattr(loop.os, 'statvfs', lambda p: os.statvfs_result(
        tuple(statvfs(p))[:8] + (os.ST_RDONLY,) + tuple(statvfs(p))[9:]))
  for run in (lambda: search.run(_tiny_search(), str(workdir)),
              lambda: train.train_and_evaluate(train.TrainConfig(arch='DARTS_V2'), str(workdir))):
    message = _one_line_exit(run)
    assert f'--workdir={workdir}' in message and (case.split()[-1] in message
                                                 or 'is a file' in message), message
  assert not (tmp_path / 'ro').exists()


@pytest.mark.parametrize('concat', [[2, 3, 4, 9], [0, 1], []])
def test_genotype_json_with_bad_concat_is_one_line(tmp_path, concat):
  path = tmp_path / 'g.json'
  path.write_text(json.dumps({**genotypes.DARTS_V2.to_dict(), 'concat': concat}))
  message = _one_line_exit(train.train_and_evaluate,
                           train.TrainConfig(genotype_json=str(path)), str(tmp_path / 'w'))
  assert str(path) in message and f'concat {concat}' in message
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('size', [1, 2])
def test_image_size_below_the_reductions_is_one_line(tmp_path, size):
  message = _one_line_exit(search.run, _tiny_search(image_size=size), str(tmp_path / 'w'))
  assert f'--image_size={size}' in message and 'multiple of 4' in message


@pytest.mark.parametrize('size', [1, 2, 100])
def test_imagenet_image_size_the_network_cannot_halve_is_one_line(size):
  with pytest.raises(ValueError, match=f'--image_size={size} must be a multiple of 32') as err:
    train.imagenet_config(arch='DARTS_V2', image_size=size)
  assert '\n' not in str(err.value)


@pytest.mark.parametrize('layers', [1, 2])
def test_layers_without_a_normal_cell_are_refused(tmp_path, layers):
  message = _one_line_exit(search.run, _tiny_search(layers=layers), str(tmp_path / 'w'))
  assert f'--layers={layers} has no normal cell' in message and '--layers >= 3' in message
  message = _one_line_exit(train.train_and_evaluate, train.TrainConfig(arch='DARTS_V2',
                                                                        layers=layers), str(tmp_path))
  assert f'--layers={layers} has no normal cell' in message


@pytest.mark.parametrize('flag, value', [('w_lr', 1e39), ('alpha_lr', float('nan')),
                                         ('w_lr', float('inf')), ('alpha_lr', 1e-50),
                                         ('resource_eta', -float('inf'))])
def test_float_flags_outside_float32_are_one_line(tmp_path, flag, value):
  message = _one_line_exit(search.run, _tiny_search(**{flag: value}), str(tmp_path / 'w'))
  assert f'--{flag}=' in message and 'float32' in message


def test_train_learning_rate_outside_float32_is_one_line(tmp_path):
  message = _one_line_exit(train.train_and_evaluate,
                           train.TrainConfig(arch='DARTS_V2', learning_rate=1e39), str(tmp_path))
  assert '--learning_rate=1e+39' in message and 'float32' in message


# ----------------------------------------------------------------------------
# Signals: the exit line and status, and a second Ctrl-C.


def test_stopped_run_exits_with_its_line_and_signal_status(capsys):
  with pytest.raises(SystemExit) as err:
    with cli.one_line_errors():
      raise loop.Interrupted('stopped by SIGTERM after step 3; ...', 143)
  assert err.value.code == 143
  assert capsys.readouterr().err.strip() == 'stopped by SIGTERM after step 3; ...'


SECOND_SIGNAL = """
import os, signal, time
from snas_jax import loop
with loop.StopRequests() as stops:
  os.kill(os.getpid(), signal.SIGINT)
  print('requested', stops.requested, flush=True)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(60)
print('not reached')
"""


def test_second_ctrl_c_exits_at_once():
  t0 = time.time()
  proc = subprocess.run([sys.executable, '-c', SECOND_SIGNAL], capture_output=True, text=True,
                        cwd=ROOT, timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert time.time() - t0 < 50
  assert proc.returncode == 128 + signal.SIGINT
  assert proc.stdout.split() == ['requested', 'SIGINT']
  lines = proc.stderr.strip().splitlines()
  assert lines[-2].startswith('SIGINT: saving a checkpoint at the next step boundary')
  assert lines[-1].startswith('SIGINT again: exiting now without saving')
