"""The search end to end: CLI outputs, DARTS mode, errors, no retracing, and
data parallelism (fake devices, two processes). Exact resume: test_faults.py."""
import json
import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from conftest import ROOT, TINY_SEARCH, run_script, search_cli
from snas_jax import costs, reporting, search
from snas_jax.spaces.darts import genotypes


def ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def finished_run(tiny_search_workdir):
  return tiny_search_workdir


def test_cli_writes_every_output(finished_run):
  for name in ('genotype.json', 'alpha_normal.npy', 'alpha_reduce.npy', 'alpha_normal.png',
               'alpha_reduce.png', 'normal_snas.png', 'reduce_snas.png', 'normal_darts.png',
               'reduce_darts.png', 'curves.png', 'metrics.jsonl', 'summary.json'):
    assert os.path.getsize(finished_run / name) > 0, name
  assert os.listdir(finished_run / 'tensorboard')
  saved = json.loads((finished_run / 'genotype.json').read_text())
  alpha = {t: np.load(finished_run / f'alpha_{t}.npy') for t in ('normal', 'reduce')}
  assert alpha['normal'].shape == (14, 8)
  # The saved genotypes are the derivations of the saved α.
  for rule in ('snas', 'darts'):
    assert genotypes.Genotype.from_dict(saved[rule]) == genotypes.derive(
        alpha['normal'], alpha['reduce'], rule)
  records = reporting.read_metrics(finished_run)
  assert [r['epoch'] for r in records] == [1, 2]
  assert [r['step'] for r in records] == [4, 8]
  for key in ('train_loss', 'train_acc', 'search_val_acc', 'child_acc', 'alpha_entropy_normal',
              'alpha_entropy_reduce', 'expected_params', 'expected_flops', 'expected_mac',
              'child_params', 'child_flops', 'child_mac', 'tau', 'lr'):
    assert all(np.isfinite(r[key]) for r in records), key
  assert records[0]['tau'] == pytest.approx(1.0) and records[1]['tau'] == pytest.approx(0.03)
  # The rate w's SGD applied (read from its state): cosine per epoch, 0.025 -> 0.001 over 2.
  assert [r['lr'] for r in records] == pytest.approx([0.025, 0.013])
  assert len(records[0]['alpha_entropy_normal_per_edge']) == 14
  assert all(0 <= r['child_acc'] <= 1 for r in records)
  # Entropy starts near the maximum log 8 (α ~ N(1, 0.01)).
  assert records[0]['alpha_entropy_normal'] == pytest.approx(np.log(8), abs=0.01)
  summary = json.loads((finished_run / 'summary.json').read_text())
  assert 0 <= summary['child_test_acc'] <= 1
  # Train loader hand-off: the genotype comes back from the Orbax checkpoint.
  assert search.load_genotype(str(finished_run)) == genotypes.Genotype.from_dict(saved['snas'])


def test_darts_mode():
  """--method=darts runs with Z = softmax(α) (no sample: every key gives the
  same Z), learns α and derives the top-2 edges per node. At the step level
  on one cell (the loop is the SNAS one, tested through the CLI above)."""
  cfg = search.SearchConfig(channels=4, layers=1, batch_size=4, epochs=1, backend='reference',
                            method='darts', resource_eta=1e-3, resource_estimator='exact',
                            alpha_lr=0.05)
  net, tx = search.make_network(cfg), search.make_optimizer(cfg, steps_per_epoch=3)
  step = jax.jit(search.train_step_fn(cfg, net, tx, costs.penalty_tables(4, 1, 8)))
  state = search.init_state(cfg, net, tx, (8, 8, 3))
  z = [search.arch_weights(cfg, state.params['alpha'], jax.random.PRNGKey(k), 1.0) for k in (0, 1)]
  np.testing.assert_array_equal(z[0]['normal'][0], z[1]['normal'][0])
  np.testing.assert_allclose(z[0]['normal'][0], jax.nn.softmax(state.params['alpha']['normal'], -1))
  rng = np.random.default_rng(0)
  alpha0 = np.asarray(state.params['alpha']['reduce'])
  for _ in range(3):
    batch = {'image': rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
             'label': rng.integers(0, 10, 4).astype(np.int32)}
    state, metrics = step(state, batch, np.float32(1.0))
    assert bool(metrics['finite'])
  assert not np.allclose(alpha0, state.params['alpha']['reduce'])
  darts = search.derive_genotypes(state.params['alpha'])['darts']
  assert all(len(node) == 2 for node in darts.normal + darts.reduce)  # top-2 per node


def test_bad_flag_value_is_one_line(tmp_path, cifar_dir):
  proc = search_cli(tmp_path / 'w', cifar_dir, '--method=enas')
  assert proc.returncode != 0 and 'method' in proc.stderr
  proc = search_cli(tmp_path / 'w', cifar_dir, '--drop_path=1.5')
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == 'error: --drop_path=1.5 must lie in [0, 1)'


def test_missing_data_dir_is_one_line(tmp_path):
  proc = run_script('search_cifar.py', f'--workdir={tmp_path / "w"}', f'--data_dir={tmp_path / "nope"}', *TINY_SEARCH)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and '--data_dir' in last
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()  # failed before any work


def test_mismatched_resume_is_one_line(finished_run, cifar_dir):
  proc = search_cli(finished_run, cifar_dir, '--channels=8')
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert '--channels=4' in last and '--channels=8' in last and 'Traceback' not in proc.stderr


def test_step_never_retraces():
  """τ, the learning rate and the data change every epoch; the step traces once."""
  cfg = search.SearchConfig(channels=4, layers=1, batch_size=4, epochs=3, backend='reference',
                            resource_eta=1e-3)
  net, tx = search.make_network(cfg), search.make_optimizer(cfg, steps_per_epoch=1)
  tables = costs.penalty_tables(cfg.channels, cfg.layers, 8)
  step = jax.jit(chex.assert_max_traces(search.train_step_fn(cfg, net, tx, tables), n=1))
  state = search.init_state(cfg, net, tx, (8, 8, 3))
  rng = np.random.default_rng(0)
  alphas = []
  for epoch in range(3):
    batch = {'image': rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
             'label': rng.integers(0, 10, 4).astype(np.int32)}
    state, metrics = step(state, batch, search.sampling.temperature(epoch, 3))
    assert bool(metrics['finite'])
    alphas.append(np.asarray(state.params['alpha']['normal']))
  assert int(state.step) == 3
  assert not np.allclose(alphas[0], alphas[-1])  # α does learn
  # A step whose update is not finite says so (the loop then saves nothing).
  batch['image'][0, 0, 0, 0] = np.inf
  _, metrics = step(state, batch, np.float32(1.0))
  assert not bool(metrics['finite'])


def test_w_learning_rate_schedule_is_the_per_epoch_cosine():
  """optax's cosine, held per epoch, equals the closed form (CosineAnnealingLR)."""
  cfg = search.SearchConfig(epochs=50, w_lr=0.025, w_lr_min=0.001)
  schedule = search.learning_rate_schedule(cfg, steps_per_epoch=7)
  counts = np.arange(50 * 7)
  epochs = np.minimum(counts // 7, 49)
  closed = 0.001 + 0.5 * (0.025 - 0.001) * (1 + np.cos(np.pi * epochs / 50))
  np.testing.assert_allclose(jax.vmap(schedule)(counts), closed, rtol=2e-6, atol=1e-8)


@pytest.fixture(scope='module')
def one_device_result(tmp_path_factory):
  out = tmp_path_factory.mktemp('parallel') / 'one.npz'
  ok(_parallel_check(out, '--devices=1'))
  return dict(np.load(out))


def _parallel_check(out, *args, env=None):
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'parallel_check.py'), str(out), *args],
                        capture_output=True, text=True, env=full_env, timeout=600, cwd=ROOT)


def _assert_same_result(a, b):
  assert set(a) == set(b)
  for key in a:
    if key != 'devices':
      np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=2e-5, err_msg=key)


def test_four_fake_devices_match_one(one_device_result, tmp_path):
  out = tmp_path / 'four.npz'
  ok(_parallel_check(out, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}))
  four = dict(np.load(out))
  assert int(four['devices']) == 4 and int(one_device_result['devices']) == 1
  _assert_same_result(four, one_device_result)


def test_two_processes_match_one(one_device_result, tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  out = tmp_path / 'two.npz'
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'tests', 'parallel_check.py'), str(out),
       f'--coordinator=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  two = dict(np.load(out))
  assert int(two['devices']) == 2
  _assert_same_result(two, one_device_result)


def test_stronger_eta_gives_sparser_cells():
  """The resource penalty makes cells cheaper: on the same data and noise, a
  strong η derives a child with more `none` edges and a lower expected cost.
  (Not necessarily fewer parameters: the log-cost mean also charges pools'
  FLOPs and MAC, so a parameter-free child of pools can lose to a sparser one.)"""
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
           'label': rng.integers(0, 10, 8).astype(np.int32)}
  results = {}
  for eta in (0.0, 1.0):
    # A fast α optimiser so that 20 steps move the argmax well past the init noise.
    cfg = search.SearchConfig(channels=4, layers=1, batch_size=8, epochs=1, backend='reference',
                              resource_eta=eta, alpha_lr=0.05)
    net, tx = search.make_network(cfg), search.make_optimizer(cfg, steps_per_epoch=20)
    tables = costs.penalty_tables(cfg.channels, cfg.layers, 8)
    step = jax.jit(search.train_step_fn(cfg, net, tx, tables))
    state = search.init_state(cfg, net, tx, (8, 8, 3))
    for _ in range(20):
      state, _ = step(state, batch, np.float32(1.0))
    alpha = state.params['alpha']
    geno = search.derive_genotypes(alpha)['snas']
    # The cost the penalty charges (mean log params/FLOPs/MAC per edge), in
    # expectation under softmax(α): what a stronger η must push down.
    expected = float(costs.expected_cost(alpha['reduce'], tables['reduce']))
    child = float((genotypes.cell_to_one_hot(geno.reduce) * tables['reduce']).sum())
    results[eta] = (sum(len(n) for n in geno.reduce), expected, child)
  kept_free, expected_free, child_free = results[0.0]
  kept_eta, expected_eta, child_eta = results[1.0]
  assert kept_eta < kept_free  # more edges derived `none` (measured 14 -> 5)
  assert expected_eta < expected_free
  assert child_eta < 0.8 * child_free


def test_init_draws_each_parameter_once_from_its_bound():
  """init_state (reference backend) draws every weight from PyTorch's
  U(±1/sqrt(fan_in)), no two alike, the same for the same seed; the tree is
  that of a plain init, BN statistics fresh."""
  cfg = search.SearchConfig(channels=4, layers=2, batch_size=4, epochs=1, backend='reference')
  net, tx = search.make_network(cfg), search.make_optimizer(cfg, steps_per_epoch=1)
  state = search.init_state(cfg, net, tx, (8, 8, 3))
  z = np.full((genotypes.NUM_EDGES, genotypes.NUM_OPS), 1 / genotypes.NUM_OPS, np.float32)
  # The plain init's shapes (compiling it, random draws and all, took 30 s).
  plain = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32),
                                          {'normal': z, 'reduce': z}, False))
  assert jax.tree.structure(plain['params']) == jax.tree.structure(state.params['w'])
  # BN statistics start as Flax's (and PyTorch's) do: mean 0, variance 1.
  fresh_stats = jax.tree_util.tree_map_with_path(
      lambda path, s: np.full(s.shape, path[-1].key == 'var', s.dtype), plain['batch_stats'])
  assert {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(fresh_stats)} == {'mean', 'var'}
  chex.assert_trees_all_equal(fresh_stats, state.batch_stats)
  w = state.params['w']
  edge = w['cell_0']['edges_from_0_1']['sep_conv_3x3']['dil_0']
  stem, dense = w['stem_conv']['kernel'], w['classifier']['kernel']
  pointwise = edge['pointwise']['kernel']  # [edges, 1, 1, C_in, C_out]
  for x, fan_in in ((edge['depthwise']['kernel'], 9), (pointwise, pointwise.shape[-2]),
                    (stem, 27), (dense, dense.shape[0])):
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.9 * bound
    np.testing.assert_allclose(np.var(np.asarray(x)), bound ** 2 / 3, rtol=0.3)
  kernels = [np.asarray(x).ravel() for path, x in jax.tree_util.tree_leaves_with_path(w)
             if path[-1].key.endswith('kernel')]
  firsts = np.array([k[0] for k in kernels])
  assert len(np.unique(firsts)) == len(firsts)  # no two parameters share a chunk
  np.testing.assert_allclose(np.asarray(w['stem_bn']['scale']), 1.0)
  again = search.init_state(cfg, net, tx, (8, 8, 3))
  chex.assert_trees_all_equal(state.params, again.params)
  other = search.init_state(search.SearchConfig(channels=4, layers=2, batch_size=4, epochs=1,
                                                backend='reference', seed=1), net, tx, (8, 8, 3))
  assert not np.allclose(stem, other.params['w']['stem_conv']['kernel'])
  chex.assert_trees_all_equal_shapes_and_dtypes(
      search.abstract_state(cfg, net, tx, (8, 8, 3)), state)
