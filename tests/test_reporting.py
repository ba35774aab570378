"""Tests for snas_jax.reporting: metric logs, progress bar, drawings, report."""
import json
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from snas_jax.spaces.darts import genotypes as G
from snas_jax import reporting as R
from snas_jax.spaces.darts import drawing as D

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

# Node 1 has no inputs; node 2 has a 'none' edge, which must not be drawn.
CELL_WITH_EMPTY_NODE = (
    (('sep_conv_3x3', 0), ('skip_connect', 1)),
    (),
    (('none', 1), ('dil_conv_5x5', 0), ('max_pool_3x3', 2)),
    (('skip_connect', 3), ('avg_pool_3x3', 4)),
)


def _is_png(path, min_bytes=1024):
  with open(path, 'rb') as f:
    data = f.read()
  return data[:8] == PNG_MAGIC and len(data) > min_bytes


def _alpha(seed):
  return np.random.default_rng(seed).normal(size=(G.NUM_EDGES, G.NUM_OPS)).astype(np.float32)


# ---------------------------------------------------------------- metrics


def test_metrics_round_trip_converts_jax_and_numpy(tmp_path):
  with R.MetricsWriter(str(tmp_path), is_writer=True, tensorboard=False) as w:
    w.write(0, {'epoch': 0, 'loss': jnp.float32(0.5), 'acc': np.float64(0.25),
                'n': np.int32(7), 'vec': jnp.arange(3), 'py': 1.5, 'name': 'x'})
    w.write(10, {'loss': jnp.array(0.1, jnp.float32), 'list': [np.float32(1.0), 2]}, epoch=1)
  records = R.read_metrics(str(tmp_path))
  assert records == [
      {'step': 0, 'epoch': 0, 'loss': 0.5, 'acc': 0.25, 'n': 7, 'vec': [0, 1, 2], 'py': 1.5,
       'name': 'x'},
      {'step': 10, 'epoch': 1, 'loss': float(np.float32(0.1)), 'list': [1.0, 2]},
  ]
  # Plain Python types, so json and any later arithmetic see ordinary numbers.
  assert type(records[0]['loss']) is float and type(records[0]['n']) is int
  assert json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[0])['loss'] == 0.5


def test_metrics_writer_defaults_to_process_0(tmp_path):
  with R.MetricsWriter(str(tmp_path), tensorboard=False) as w:  # Single process: index 0.
    assert w.is_writer
    w.write(1, {'epoch': 0, 'loss': 2.0})
  assert R.read_metrics(str(tmp_path)) == [{'step': 1, 'epoch': 0, 'loss': 2.0}]


def test_metrics_write_needs_epoch(tmp_path):
  with R.MetricsWriter(str(tmp_path), is_writer=True, tensorboard=False) as w:
    with pytest.raises(ValueError, match='epoch'):
      w.write(0, {'loss': 1.0})


def test_metrics_resume_keeps_steps_up_to_resume_step(tmp_path):
  with R.MetricsWriter(str(tmp_path), is_writer=True, tensorboard=False) as w:
    for step in range(10):
      w.write(step, {'epoch': step // 3, 'loss': float(step)})
  # A crash mid-write leaves a partial last line; resuming must survive it.
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 10, "epo')
  with R.MetricsWriter(str(tmp_path), resume_step=4, is_writer=True, tensorboard=False) as w:
    assert [r['step'] for r in R.read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4]
    w.write(5, {'epoch': 1, 'loss': 55.0})
  records = R.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [0, 1, 2, 3, 4, 5]
  assert records[4]['loss'] == 4.0 and records[5]['loss'] == 55.0
  assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


def test_metrics_without_resume_step_appends(tmp_path):
  for step in (0, 1):
    with R.MetricsWriter(str(tmp_path), is_writer=True, tensorboard=False) as w:
      w.write(step, {'epoch': 0, 'loss': 1.0})
  assert [r['step'] for r in R.read_metrics(str(tmp_path))] == [0, 1]
  assert R.read_metrics(str(tmp_path / 'missing')) == []


def test_metrics_tensorboard_scalars(tmp_path):
  import tensorflow as tf
  with R.MetricsWriter(str(tmp_path), is_writer=True) as w:
    w.write(3, {'epoch': 0, 'train_loss': jnp.float32(1.25), 'vec': [1.0, 2.0], 'note': 'x'})
    w.write(7, {'epoch': 1, 'train_loss': 0.75})
    w.flush()
  tb_dir = tmp_path / 'tensorboard'
  event_files = [p for p in os.listdir(tb_dir) if 'tfevents' in p]
  assert len(event_files) == 1
  seen = {}
  for event in tf.compat.v1.train.summary_iterator(str(tb_dir / event_files[0])):
    for value in event.summary.value:
      seen[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
      # Marked as a scalar, so TensorBoard's scalar dashboard shows it.
      assert value.metadata.plugin_data.plugin_name == 'scalars'
  assert seen == {('train_loss', 3): 1.25, ('train_loss', 7): 0.75}
  # The non-scalars stayed in the JSON log.
  assert R.read_metrics(str(tmp_path))[0]['vec'] == [1.0, 2.0]


def _tb_scalars(tb_dir):
  """{(tag, step): value} over every event file in tb_dir."""
  import tensorflow as tf
  seen = {}
  for name in os.listdir(tb_dir):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(tb_dir, name)):
      for value in event.summary.value:
        assert (value.tag, event.step) not in seen, 'duplicate TensorBoard point'
        seen[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
  return seen


def test_metrics_resume_rebuilds_tensorboard(tmp_path):
  with R.MetricsWriter(str(tmp_path), is_writer=True) as w:
    for step in range(6):
      w.write(step, {'epoch': 0, 'loss': float(step), 'vec': [1, 2]})
  with R.MetricsWriter(str(tmp_path), resume_step=2, is_writer=True) as w:
    w.write(3, {'epoch': 0, 'loss': 33.0})
  assert _tb_scalars(tmp_path / 'tensorboard') == {
      ('loss', 0): 0.0, ('loss', 1): 1.0, ('loss', 2): 2.0, ('loss', 3): 33.0}


def test_non_writer_process_writes_nothing(tmp_path, capsys):
  workdir = tmp_path / 'run'
  w = R.MetricsWriter(str(workdir), resume_step=0, is_writer=False)
  w.write(0, {'epoch': 0, 'loss': 1.0})
  w.flush()
  w.close()
  bar = R.ProgressBar(10, desc='epoch 0', is_writer=False)
  bar.update(5, loss=0.5)
  bar.close()
  assert not workdir.exists()
  assert capsys.readouterr().err == ''


def test_progress_bar(capsys):
  bar = R.ProgressBar(4, desc='epoch 1/2', is_writer=True)
  for _ in range(4):
    bar.update(1, loss=jnp.float32(0.5), acc=0.25)
  bar.close()
  err = capsys.readouterr().err
  assert 'epoch 1/2' in err and '4/4' in err and 'loss=0.5' in err and 'acc=0.25' in err
  disabled = R.ProgressBar(4, enabled=False, is_writer=True)
  disabled.update(4, loss=1.0)
  disabled.close()
  assert capsys.readouterr().err == ''


# ---------------------------------------------------------------- drawings


def test_draw_cell_matplotlib_when_dot_is_absent(tmp_path, monkeypatch):
  monkeypatch.setattr(R.shutil, 'which', lambda name: None)
  path = str(tmp_path / 'cell.png')
  assert D.draw_cell(CELL_WITH_EMPTY_NODE, path, 'normal cell') == path
  assert _is_png(path, min_bytes=10_000)
  assert not (tmp_path / 'cell.dot').exists()
  # Output files are readable by others, like any other file the run writes.
  assert os.stat(path).st_mode & stat.S_IRGRP or os.umask(os.umask(0)) & 0o040


def test_draw_cell_published_cells_with_none_edges(tmp_path, monkeypatch):
  monkeypatch.setattr(R.shutil, 'which', lambda name: None)
  for name, g in G.PUBLISHED.items():
    for which in ('normal', 'reduce'):
      assert _is_png(D.draw_cell(getattr(g, which), str(tmp_path / f'{name}_{which}.png'), name))


def _fake_dot(tmp_path, exit_code):
  """A stand-in `dot` that writes a PNG header to its -o argument."""
  script = tmp_path / 'dot'
  script.write_text(
      '#!/usr/bin/env python3\n'
      'import sys\n'
      'out = sys.argv[sys.argv.index("-o") + 1]\n'
      f'open(out, "wb").write({PNG_MAGIC!r} + b"fake-graphviz")\n'
      f'sys.exit({exit_code})\n')
  script.chmod(0o755)
  return str(script)


def test_draw_cell_graphviz(tmp_path, monkeypatch):
  dot = _fake_dot(tmp_path, exit_code=0)
  monkeypatch.setattr(R.shutil, 'which', lambda name: dot if name == 'dot' else None)
  path = str(tmp_path / 'cell.png')
  assert D.draw_cell(CELL_WITH_EMPTY_NODE, path, 'my "cell"') == path
  assert open(path, 'rb').read() == PNG_MAGIC + b'fake-graphviz'
  source = (tmp_path / 'cell.dot').read_text()
  assert source.count('label="sep_conv_3x3"') == 1
  assert '"c_{k-2}" -> "2" [label="dil_conv_5x5"' in source
  assert '"1" -> "3" [label="skip_connect"' in source
  assert 'none' not in source
  # Node 1 has no inputs but is still drawn, and still feeds the concat.
  assert '"1" [fillcolor=lightblue, style="rounded,filled,dashed"' in source
  assert '"1" -> "c_{k}"' in source
  assert 'label="my \\"cell\\""' in source


def test_draw_cell_falls_back_when_dot_fails(tmp_path, monkeypatch):
  dot = _fake_dot(tmp_path, exit_code=1)
  monkeypatch.setattr(R.shutil, 'which', lambda name: dot if name == 'dot' else None)
  path = str(tmp_path / 'cell.png')
  D.draw_cell(CELL_WITH_EMPTY_NODE, path, 'cell')
  assert _is_png(path, min_bytes=10_000)  # The matplotlib drawing, not the fake's bytes.
  assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


def test_alpha_heatmap(tmp_path):
  path = str(tmp_path / 'alpha.png')
  assert R.plot_alpha_heatmap(jnp.asarray(_alpha(0)), path, 'alpha') == path
  assert _is_png(path)
  with pytest.raises(ValueError, match='14, 8'):
    R.plot_alpha_heatmap(np.zeros((8, 14)), path, 'wrong')


def test_plot_curves_skips_missing_keys(tmp_path):
  records = [{'step': e, 'epoch': e, 'train_acc': 0.1 * e, 'tau': 1.0 - 0.1 * e} for e in range(5)]
  records.append({'step': 9, 'epoch': 5, 'child_acc': 0.9})  # A key in only one record.
  path = str(tmp_path / 'curves.png')
  panels = {'accuracy': ['train_acc', 'child_acc', 'never_logged'], 'nothing': ['absent']}
  assert R.plot_curves(records, path, panels) == path
  assert _is_png(path)
  assert R._series(records, 'child_acc') == ([5.0], [0.9])
  assert R._series(records, 'absent') == ([], [])


def test_write_search_report(tmp_path, monkeypatch):
  monkeypatch.setattr(R.shutil, 'which', lambda name: None)
  alphas = {'normal': _alpha(1), 'reduce': jnp.asarray(_alpha(2))}
  genotypes = {rule: G.derive(alphas['normal'], alphas['reduce'], rule)
               for rule in ('snas', 'darts')}
  records = [{'step': 10 * e, 'epoch': e, 'train_acc': 0.5, 'search_val_acc': 0.4,
              'alpha_entropy_normal': 2.0, 'alpha_entropy_reduce': 2.0, 'expected_params': 1.0,
              'expected_flops': 1e8, 'tau': 1.0} for e in range(3)]
  workdir = tmp_path / 'search'
  paths = R.write_search_report(str(workdir), genotypes, alphas, records)
  expected = ['genotype.json', 'alpha_normal.npy', 'alpha_reduce.npy', 'normal_snas.png',
              'reduce_snas.png', 'normal_darts.png', 'reduce_darts.png', 'alpha_normal.png',
              'alpha_reduce.png', 'curves.png']
  assert sorted(os.path.basename(p) for p in paths) == sorted(expected)
  assert sorted(os.listdir(workdir)) == sorted(expected)  # No temporary files left.
  for p in paths:
    if p.endswith('.png'):
      assert _is_png(p), p
  saved = json.loads((workdir / 'genotype.json').read_text())
  assert set(saved) == {'snas', 'darts'}
  for rule, g in genotypes.items():
    assert G.Genotype.from_dict(saved[rule]) == g
  np.testing.assert_array_equal(np.load(workdir / 'alpha_normal.npy'), alphas['normal'])
  np.testing.assert_array_equal(np.load(workdir / 'alpha_reduce.npy'), np.asarray(alphas['reduce']))
