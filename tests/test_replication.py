"""The study driver and the Table 1 report end to end on a tiny setting: 2
arms x 2 seeds, 2 epochs of 2 steps, a grid killed part-way and resumed, and
the report's numbers against the metrics files they came from."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import CACHE_DIR, ROOT

# Compile-fast flags (tests/conftest.py TINY_SEARCH) with a held-out split.
TINY_SETTINGS = ['--channels=4', '--layers=3', '--image_size=8', '--num_train_images=64',
                 '--heldout_images=64', '--num_test_images=64', '--batch_size=32',
                 '--eval_batch_size=64', '--epochs=2', '--checkpoint_every_steps=100',
                 '--alpha_lr=0.06']
METHODS = ['snas_none', 'darts']
SEEDS = [0, 1]


def replicate(workdir, docs, settings, *extra, seeds=SEEDS, search_flags=()):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'study.py'), '--study=table1',
       f'--workdir={workdir}', f'--docs_dir={docs}', f'--settings={settings}',
       f'--arms={",".join(METHODS)}', f'--seeds={",".join(map(str, seeds))}',
       '--backend=reference', *extra, '--', f'--compilation_cache_dir={CACHE_DIR}',
       *search_flags],
      capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope='module')
def replication(tmp_path_factory, cifar_dir):
  """The grid run as a user whose machine stops part-way would: the seed-0
  runs first; then the whole grid, whose first unfinished run stops after one
  step (as if preempted: --stop_after_step), which stops the driver; then the
  whole grid again, which skips the finished runs and resumes the stopped one."""
  root = tmp_path_factory.mktemp('replication')
  settings = root / 'tiny.flags'
  settings.write_text('\n'.join([f'--data_dir={cifar_dir}', *TINY_SETTINGS]) + '\n')
  workdir, docs = root / 'work', root / 'docs'
  procs = [replicate(workdir, docs, settings, seeds=[0]),
           replicate(workdir, docs, settings, search_flags=['--stop_after_step=1']),
           replicate(workdir, docs, settings)]
  for proc in (procs[0], procs[2]):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return workdir, docs, settings, procs


def _final(run):
  records = {}
  with open(run / 'metrics.jsonl') as f:
    for line in f:
      r = json.loads(line)
      if 'child_acc' in r:
        records[r['epoch']] = r
  return records[max(records)]


def test_every_run_finishes_on_a_heldout_split(replication):
  workdir, _, _, _ = replication
  from snas_jax import study as repl
  for method in METHODS:
    for seed in SEEDS:
      run = workdir / 'runs' / method / f'seed{seed}'
      assert (run / 'summary.json').is_file() and (run / 'genotype.json').is_file()
      config = repl.run_config(str(run))
      assert config['method'] == ('darts' if method == 'darts' else 'snas')
      assert config['seed'] == seed and config['heldout_images'] == 64  # never the test set
      assert config['backend'] == 'reference'
      assert len(repl.epoch_records(str(run))) == 2
  state = json.loads((workdir / 'replication.json').read_text())
  assert set(state['runs']) == {f'{m}/seed{s}' for m in METHODS for s in SEEDS}
  assert all(r['wall_s'] > 0 and r['commits'] for r in state['runs'].values())
  assert state['study'] == 'table1' and len(state['invocations']) == 3


def test_a_killed_grid_resumes(replication):
  """The stopped driver says which run to resume; the next invocation skips
  the finished runs, resumes the stopped one from its checkpoint and runs the rest."""
  workdir, _, _, procs = replication
  assert procs[0].stdout.count('searching') == 2
  killed = procs[1]
  assert killed.returncode != 0 and '[1/4] snas_none/seed0: finished, skipped' in killed.stdout
  assert 'error: snas_none/seed1 failed (exit 0); rerun the command to resume it' in killed.stderr
  assert 'darts' not in killed.stdout  # the driver stopped with the run
  resumed = procs[2].stdout
  for line in ('[1/4] snas_none/seed0: finished, skipped', '[2/4] snas_none/seed1: searching',
               '[3/4] darts/seed0: finished, skipped', '[4/4] darts/seed1: searching'):
    assert line in resumed, resumed
  log = (workdir / 'runs' / 'snas_none' / 'seed1' / 'log.txt').read_text()
  assert 'stopped after step 1' in log and 'from step 1' in log.split('stopped after step 1')[1]
  assert log.count('$ ') == 2  # two search processes, one run


def test_report_numbers_come_from_the_metrics_files(replication):
  workdir, docs, _, _ = replication
  report = json.loads((workdir / 'report.json').read_text())
  md = (docs / 'replication.md').read_text()
  for method in METHODS:
    runs = [workdir / 'runs' / method / f'seed{s}' for s in SEEDS]
    finals = [_final(r) for r in runs]
    tests = [json.loads((r / 'summary.json').read_text())['child_test_acc'] for r in runs]
    expect = {'search_val_acc': [f['search_val_acc'] for f in finals],
              'child_val_acc': [f['child_acc'] for f in finals],
              'child_test_acc': tests,
              'gap': [f['child_acc'] - f['search_val_acc'] for f in finals],
              'child_params': [f['child_params'] for f in finals]}
    got = report['summary'][method]
    for key, values in expect.items():
      np.testing.assert_allclose(got[key], [np.mean(values), np.std(values, ddof=1)],
                                 atol=1e-12, err_msg=f'{method} {key}')
    row = next(line for line in md.splitlines() if line.startswith('| ' + {
        'snas_none': 'SNAS, no constraint', 'darts': 'DARTS'}[method]))
    for key in ('search_val_acc', 'child_val_acc', 'child_test_acc'):
      mean, sd = np.mean(expect[key]), np.std(expect[key], ddof=1)
      assert f'{100 * mean:.2f} ± {100 * sd:.2f}' in row, (key, row)
    gap = np.mean(expect['gap'])
    assert f'{100 * gap:+.2f} ± ' in row
    # `none` edges: counted from the genotype of the method's own rule.
    rule = 'darts' if method == 'darts' else 'snas'
    nones = [28 - sum(op != 'none' for cell in ('normal', 'reduce') for node in
                      json.loads((r / 'genotype.json').read_text())[rule][cell] for op, _ in node)
             for r in runs]
    np.testing.assert_allclose(got['none_edges'][0], np.mean(nones))
    if method == 'darts':
      assert nones == [12, 12]  # top-2 per node
    # τ only where Z is sampled at a temperature: SNAS.
    tau_row = [line for line in md.splitlines() if line.startswith('| ' + {
        'snas_none': 'SNAS, no constraint', 'darts': 'DARTS'}[method])][1]
    expected = '— (no sampling)' if method == 'darts' else f'{finals[0]["tau"]:.3f}'
    assert tau_row.endswith(f'| {expected} |'), tau_row
  # The comparison with the paper is computed: its gaps appear in the text.
  snas_gap = report['summary']['snas_none']['gap'][0]
  assert f'child − search = {100 * snas_gap:+.2f}' in md
  assert 'Commit(s) the runs used' in md and 'Machine:' in md
  for name in ['replication_curves.png'] + [f'replication_cell_{m}_{c}.png' for m in METHODS
                                            for c in ('normal', 'reduce')]:
    assert (docs / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', name
    assert f']({name})' in md


def test_report_regenerates_the_same_numbers_from_the_run_folders(replication, tmp_path):
  workdir, docs, _, _ = replication
  from snas_jax import study
  from snas_jax.studies import table1
  before = json.loads((workdir / 'report.json').read_text())
  result = study.write_report(table1.STUDY, str(workdir), str(tmp_path))
  assert (tmp_path / 'replication.md').read_bytes() == (docs / 'replication.md').read_bytes()
  assert json.loads(json.dumps(result['summary'])) == before['summary']
  for name in before['figures']:
    png = os.path.basename(before['figures'][name])
    assert (tmp_path / png).read_bytes() == (docs / png).read_bytes(), png


def test_rerun_skips_finished_runs_and_report_only_rebuilds(replication):
  workdir, docs, settings, _ = replication
  before = {p: p.stat().st_mtime_ns for p in workdir.glob('runs/*/*/summary.json')}
  (docs / 'replication.md').unlink()
  proc = replicate(workdir, docs, settings)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count('finished, skipped') == len(METHODS) * len(SEEDS)
  assert {p: p.stat().st_mtime_ns for p in workdir.glob('runs/*/*/summary.json')} == before
  assert (docs / 'replication.md').is_file()
  (docs / 'replication.md').unlink()
  proc = replicate(workdir, docs, settings, '--report')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'searching' not in proc.stdout and (docs / 'replication.md').is_file()
