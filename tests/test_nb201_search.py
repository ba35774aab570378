"""--space=nb201 through the search: a tiny NAS-Bench-201 search end to end
on the reference backend (CLI, resume, outputs, the benchmark's record per
epoch) and on the CPU backend (resume), GDAS at the step level, and the
one-line refusals."""
import json

import jax
import numpy as np
import pytest

from conftest import search_cli
from snas_jax import costs, reporting, search
from snas_jax.spaces import nb201

# C = 4, N = 1 (3 cells), 8x8 images, 128 training images: 4 steps of 32 in
# one epoch (one epoch: the benchmark's record of its derived cell is the
# final one, which the uninterrupted run gives).
NB201 = ['--space=nb201', '--layers=1', '--epochs=1']
TIMING_KEYS = {'epoch_time_s', 'images_per_s'}


@pytest.fixture(scope='module')
def nb201_search(tmp_path_factory, cifar_dir):
  """An uninterrupted tiny NB201 search (no benchmark)."""
  workdir = tmp_path_factory.mktemp('nb201') / 'full'
  proc = search_cli(workdir, cifar_dir, *NB201)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_outputs_hold_the_arch_string(nb201_search):
  saved = json.loads((nb201_search / 'genotype.json').read_text())
  assert set(saved) == {'snas', 'darts'}
  archs = {rule: nb201.Arch.from_dict(d) for rule, d in saved.items()}
  assert all(nb201.Arch.from_string(str(a)) == a for a in archs.values())
  assert 'none' not in archs['darts'].ops  # the darts rule never picks none
  alpha = np.load(nb201_search / 'alpha_cell.npy')
  assert alpha.shape == (6, 5)
  for rule in ('snas', 'darts'):
    assert archs[rule] == nb201.SPACE.derive({'cell': alpha}, rule)
  for name in search.output_files('nb201'):
    assert (nb201_search / name).exists(), name
  assert {'cell_snas.png', 'cell_darts.png', 'alpha_cell.png'} <= set(search.output_files('nb201'))
  summary = json.loads((nb201_search / 'summary.json').read_text())
  assert summary['space'] == 'nb201' and summary['genotype'] == saved['snas']
  assert ('disconnection' in summary) == (archs['snas'].disconnection() is not None)
  record, = reporting.read_metrics(nb201_search)
  assert record['step'] == 4 and 0 <= record['child_acc'] <= 1
  assert len(record['alpha_entropy_cell_per_edge']) == 6
  # The child's cost is the derived cell's, 3 cells (C, 2C, 4C at 8, 4, 2 px).
  tables = nb201.network_cost_tables(4, 1, 8)['cell']
  rows = [nb201.OP_NAMES.index(op) for op in archs['snas'].ops]
  want = sum(tables[i, e, k, 0] for i in range(3) for e, k in enumerate(rows))
  assert record['child_params'] == want
  # Retraining reads it back: --search_workdir with --space=nb201, refused with darts.
  from snas_jax import train
  assert train.resolve_genotype(train.TrainConfig(
      space='nb201', search_workdir=str(nb201_search), layers=1)) == archs['snas']
  with pytest.raises(ValueError, match='searched the nb201 space, not --space=darts: pass '
                     '--space=nb201'):
    train.resolve_genotype(train.TrainConfig(search_workdir=str(nb201_search)))


def test_resume_with_the_benchmark_ends_as_the_uninterrupted_run(nb201_search, tmp_path, cifar_dir,
                                                                  monkeypatch):
  """Stopped after step 2 and rerun, with --benchmark_dir (a tiny NATS-Bench
  holding the derived cell): every output equals the uninterrupted run's, and
  the epoch record and the summary carry the cell's benchmark record."""
  pytest.importorskip('nats_bench')
  from nats_bench.api_utils import pickle_save
  import test_benchmark as tb
  arch = json.loads((nb201_search / 'genotype.json').read_text())['snas']['arch']
  archs = tuple(dict.fromkeys(tb.ARCHS + (arch,)))
  monkeypatch.setattr(tb, 'ARCHS', archs)  # its records name their cell by index
  folder = tmp_path / tb.benchmark.FOLDER_NAME
  folder.mkdir()
  pickle_save(tb.meta(archs), str(folder / 'meta.pickle'))
  index = archs.index(arch)
  pickle_save(tb.cell_records(index), str(folder / f'{index:06d}.pickle'))

  workdir = tmp_path / 'resumed'
  args = (*NB201, f'--benchmark_dir={folder}')
  stopped = search_cli(workdir, cifar_dir, *args, '--stop_after_step=2')
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert not (workdir / 'genotype.json').exists()
  resumed = search_cli(workdir, cifar_dir, *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]

  for name in ('genotype.json', 'alpha_cell.npy'):
    assert (workdir / name).read_bytes() == (nb201_search / name).read_bytes(), name
  want = tb.expected_record(index)
  record, = reporting.read_metrics(workdir)
  assert {k: record[k] for k in want} == want
  strip = lambda r: {k: v for k, v in r.items() if k not in TIMING_KEYS | set(want)}
  assert strip(record) == strip(reporting.read_metrics(nb201_search)[0])
  assert json.loads((workdir / 'summary.json').read_text())['benchmark'] == want


def test_cpu_backend_search_split_over_the_cores_and_resumed(nb201_search, tmp_path, cifar_dir):
  """On the CPU backend (its process settings; NB201's ops have no CPU form, so
  the reference modules run) the batch is split over one XLA device per core
  by default. Stopped after step 2 with --backend=cpu and resumed with
  --backend=auto (the CPU backend on this host): it ran on that many devices
  and ends as the uninterrupted reference run on one device, up to float
  rounding (the cross-device sums add in another order)."""
  from snas_jax.backends.cpu import process
  workdir = tmp_path / 'cpu'
  stopped = search_cli(workdir, cifar_dir, *NB201, '--backend=cpu', '--stop_after_step=2')
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert not (workdir / 'genotype.json').exists()
  resumed = search_cli(workdir, cifar_dir, *NB201, '--backend=auto')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  devices = process.default_devices('nb201', [32, 64])  # TINY_SEARCH's batches
  meta = json.loads((workdir / 'checkpoints' / '4' / 'meta' / 'metadata').read_text())
  assert meta['device_count'] == devices and 'resumes' not in meta
  if devices > 1:
    assert f'the batch split over {devices} XLA devices' in resumed.stdout
  np.testing.assert_allclose(np.load(workdir / 'alpha_cell.npy'),
                             np.load(nb201_search / 'alpha_cell.npy'), rtol=0, atol=1e-5)
  assert (json.loads((workdir / 'genotype.json').read_text())
          == json.loads((nb201_search / 'genotype.json').read_text()))


def test_gdas_search_step_on_nb201():
  """--method=gdas --space=nb201 at the step level: one-hot Z per step, α
  learns, the child is the DARTS rule's cell (no none)."""
  cfg = search.SearchConfig(space='nb201', channels=4, layers=1, batch_size=4, epochs=1,
                            image_size=8, backend='reference', method='gdas',
                            resource_eta=1e-3, alpha_lr=0.05)
  cfg.check()
  net, tx = search.make_network(cfg), search.make_optimizer(cfg, steps_per_epoch=3)
  tables = costs.penalty_tables(4, 1, 8, space='nb201')
  step = jax.jit(search.train_step_fn(cfg, net, tx, tables))
  state = search.init_state(cfg, net, tx, (8, 8, 3))
  assert set(state.params['alpha']) == {'cell'}
  forward, hard = search.arch_weights(cfg, state.params['alpha'], jax.random.PRNGKey(0),
                                      cfg.tau0)['cell']
  np.testing.assert_array_equal(forward, hard)
  assert forward.shape == (6, 5) and np.all(np.asarray(forward).sum(-1) == 1)
  rng = np.random.default_rng(0)
  alpha0 = np.asarray(state.params['alpha']['cell'])
  for _ in range(3):
    batch = {'image': rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
             'label': rng.integers(0, 10, 4).astype(np.int32)}
    state, metrics = step(state, batch, np.float32(cfg.tau0))
    assert bool(metrics['finite'])
  assert not np.allclose(alpha0, state.params['alpha']['cell'])
  child = search.child_arch_weights(cfg, state.params['alpha'])
  want = nb201.derive_darts(np.asarray(state.params['alpha']['cell']))
  np.testing.assert_array_equal(child['cell'], want.one_hot())


def test_one_line_refusals():
  with pytest.raises(ValueError, match='for --space=nb201; a --space=darts search has no benchmark'):
    search.SearchTask(search.SearchConfig(benchmark_dir='/nonexistent', backend='reference'))
  with pytest.raises(ValueError, match='the NB201 supernet has no drop-path'):
    search.SearchConfig(space='nb201', layers=1, drop_path=0.2).check()
  with pytest.raises(ValueError, match='--image_size=6: the two stride-2 residual blocks'):
    search.SearchConfig(space='nb201', layers=1, image_size=6).check()


def test_a_checkpoint_without_space_resumes_as_darts(tmp_path):
  """A checkpoint written before --space existed holds no 'space': it ran the DARTS space."""
  from snas_jax import checkpoint, config as config_lib
  saved = config_lib.to_dict(search.SearchConfig())
  del saved['space']
  search.check_resume_config(saved, search.SearchConfig(space='darts'), str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError, match="--space='darts' there, --space='nb201' now"):
    search.check_resume_config(saved, search.SearchConfig(space='nb201', layers=5),
                               str(tmp_path))


def test_train_summary_counts_tinynetwork():
  """train_cifar --space=nb201 --arch=<arch string> --summary: the parameters
  and multiply-adds of xautodl's TinyNetwork (tests/data/nb201_golden.npz;
  its FLOPs add the classifier's bias, one per class), for 100 classes
  through the CLI and every golden cell at 10 classes in process."""
  from conftest import run_script
  from snas_jax import train
  from test_nb201 import gen
  counts = gen.load()['counts']
  arch = gen.COUNT_ARCHS[2]
  proc = run_script('train_cifar.py', '--space=nb201', f'--arch={arch}', '--dataset=cifar100',
                    '--channels=16', '--layers=5', '--summary')
  assert proc.returncode == 0, proc.stderr[-3000:]
  k = gen.COUNT_CLASSES.index(100)
  params, flops = int(counts['params'][2, k]), int(counts['flops'][2, k])
  assert proc.stdout.strip().splitlines()[-1] == (
      f'--arch={arch} on cifar100 (C=16, L=5, 32x32): params {params / 1e6:.2f}M ({params}, '
      f'auxiliary head excluded), multiply-adds {(flops - 100) / 1e6:.1f}M ({flops - 100}) '
      f'per image')
  k = gen.COUNT_CLASSES.index(10)
  for a, arch in enumerate(gen.COUNT_ARCHS):
    cfg = train.TrainConfig(space='nb201', arch=arch, channels=16, layers=5)
    assert (cfg.auxiliary_weight, cfg.drop_path_prob, cfg.init) == (0.0, 0.0, 'pytorch')
    got = train.summarize(cfg)
    assert (got['params'], got['multiply_adds'] + 10) == (counts['params'][a, k],
                                                          counts['flops'][a, k]), arch


def test_train_refusals_are_one_line():
  from snas_jax import train
  arch = '|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|none~2|'
  with pytest.raises(ValueError, match='has no auxiliary head; use --auxiliary_weight=0'):
    train.TrainConfig(space='nb201', arch=arch, auxiliary_weight=0.4).check()
  with pytest.raises(ValueError, match='has no drop-path; use --drop_path_prob=0'):
    train.TrainConfig(space='nb201', arch=arch, drop_path_prob=0.2).check()
  with pytest.raises(ValueError, match=r"malformed NB201 arch string .* at position 18: unknown op 'conv'"):
    train.resolve_genotype(train.TrainConfig(space='nb201', arch='|nor_conv_3x3~0|+|conv~0|'))
  assert train.TrainConfig().auxiliary_weight == 0.4 and train.TrainConfig().init == 'snas'


def test_disconnection_is_reported_for_nb201_only():
  from snas_jax.spaces.darts import genotypes
  cut = nb201.Arch.from_string('|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|')
  assert 'has no path from its input (node 0) to its output (node 3)' in search.disconnection(cut)
  assert search.disconnection(nb201.Arch.from_string(nb201.EXAMPLE)) is None
  assert search.disconnection(genotypes.SNAS_MILD) is None
