"""snas_jax.benchmark: NAS-Bench-201 lookups, read through the real nats_bench
API from a tiny benchmark this test writes in NATS-Bench's on-disk format.

The format, as nats_bench 1.8 reads it (api_topology.NATStopology.__init__,
api_utils.NASBenchMetaAPI.reload) and as the release's files hold it: the
-simple folder has meta.pickle.pbz2 (a bz2 pickle of {'meta_archs': [arch
strings], 'total_archs', 'arch2infos': None, 'evaluated_indexes': set()}) and
one NNNNNN.pickle.pbz2 per cell, {'12': ArchResults.state_dict(), '200': ...};
the single .pickle.pbz2 file holds the meta keys with 'arch2infos' {index:
that dict} and 'evaluated_indexes' every index. Records are built with
nats_bench's own ResultsCount / ArchResults, as AutoDL-Projects builds the
real benchmark: per dataset and seed, train and evaluation metrics for every
epoch ('x-valid@199', ...).
"""
import collections
import os
import subprocess
import sys

import pytest

nats_bench = pytest.importorskip('nats_bench')
from nats_bench.api_utils import ArchResults, ResultsCount, pickle_save  # noqa: E402

from conftest import ROOT  # noqa: E402
from snas_jax import benchmark  # noqa: E402

ARCHS = (
    '|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|',
    '|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|',
    '|nor_conv_1x1~0|+|none~0|none~1|+|none~0|none~1|skip_connect~2|',
)
EPOCHS = {'12': 12, '200': 200}
SEEDS = {'12': (111,), '200': (777, 888)}
# The evaluation sets of each dataset, as in the release's records.
EVAL_SETS = {'cifar10-valid': ('x-valid', 'ori-test'), 'cifar10': ('ori-test',),
             'cifar100': ('x-valid', 'x-test', 'ori-test'),
             'ImageNet16-120': ('x-valid', 'x-test', 'ori-test')}
# Final-epoch accuracy (%) of cell 0, 200 epochs, mean over seeds; distinct per set.
BASE_ACC = {('cifar10-valid', 'x-valid'): 80.0, ('cifar10-valid', 'ori-test'): 79.0,
            ('cifar10', 'ori-test'): 90.0, ('cifar100', 'x-valid'): 60.0,
            ('cifar100', 'x-test'): 58.0, ('cifar100', 'ori-test'): 59.0,
            ('ImageNet16-120', 'x-valid'): 40.0, ('ImageNet16-120', 'x-test'): 37.0,
            ('ImageNet16-120', 'ori-test'): 38.5}


def final_acc(index, hp, dataset, eval_set, seed):
  """Cell ``index``'s accuracy (%) after the last epoch: the 12-epoch runs
  20 points lower; the seeds of a run ±1 around their mean."""
  acc = BASE_ACC[(dataset, eval_set)] + index - (20 if hp == '12' else 0)
  seeds = SEEDS[hp]
  return acc + (0 if len(seeds) == 1 else (-1 if seed == seeds[0] else 1))


def costs(index, dataset):
  """(params M, FLOPs M): the CIFAR-100 and ImageNet16-120 networks differ."""
  params = 0.1 + 0.5 * index + {'cifar100': 0.006, 'ImageNet16-120': 0.007}.get(dataset, 0)
  flops = 10.0 + 40 * index
  return params, flops / 4 if dataset == 'ImageNet16-120' else flops


def arch_results(index, hp):
  """The ArchResults of one cell and schedule, as the benchmark stores it."""
  epochs = EPOCHS[hp]
  results = ArchResults(index, ARCHS[index])
  for dataset, eval_sets in EVAL_SETS.items():
    params, flops = costs(index, dataset)
    for seed in SEEDS[hp]:
      # Accuracies rise to their final value: earlier epochs are 10 points lower.
      curve = lambda last: {e: last - (10 if e < epochs - 1 else 0) for e in range(epochs)}
      train = curve(95.0)
      run = ResultsCount(dataset, None, train, {e: 0.1 for e in range(epochs)}, params, flops,
                         {'channel': 16, 'num_cells': 5, 'arch_str': ARCHS[index],
                          'class_num': 10}, f'{seed:04d}', epochs, [0.01])
      run.update_train_info(train, None, {e: 0.1 for e in range(epochs)},
                            collections.OrderedDict((e, 7.0) for e in range(epochs)))
      accs, losses, times = {}, {}, {}
      for eval_set in eval_sets:
        for e, acc in curve(final_acc(index, hp, dataset, eval_set, seed)).items():
          key = f'{eval_set}@{e}'
          accs[key], losses[key], times[key] = acc, 0.5, 1.0
      run.update_eval(accs, losses, times)
      results.update(dataset, seed, run)
  results.clear_params()
  return results.state_dict()


def cell_records(index):
  return collections.OrderedDict((hp, arch_results(index, hp)) for hp in ('12', '200'))


def meta(archs):
  return {'meta_archs': list(archs), 'total_archs': len(archs), 'arch2infos': None,
          'evaluated_indexes': set()}


@pytest.fixture(scope='module')
def bench_paths(tmp_path_factory):
  """{'folder': the -simple folder, 'file': the single .pickle.pbz2 file}."""
  root = tmp_path_factory.mktemp('nats')
  folder = root / 'NATS-tss-v1_0-3ffb9-simple'
  folder.mkdir()
  pickle_save(meta(ARCHS), str(folder / 'meta.pickle'))  # pickle_save adds '.pbz2'
  records = {i: cell_records(i) for i in range(len(ARCHS))}
  for i, record in records.items():
    pickle_save(record, str(folder / f'{i:06d}.pickle'))
  single = dict(meta(ARCHS), arch2infos=records, evaluated_indexes=set(records))
  pickle_save(single, str(root / 'NATS-tss-v1_0-3ffb9.pickle'))
  return {'folder': str(folder), 'file': str(root / 'NATS-tss-v1_0-3ffb9.pickle.pbz2'),
          'root': root}


def expected_record(index):
  seeds = SEEDS['200']
  mean = lambda dataset, eval_set: sum(
      final_acc(index, '200', dataset, eval_set, seed) for seed in seeds) / len(seeds) / 100
  params, flops = costs(index, 'cifar10')
  return {'bench_index': index,
          'bench_cifar10_valid_acc': mean('cifar10-valid', 'x-valid'),
          'bench_cifar10_test_acc': mean('cifar10', 'ori-test'),
          'bench_cifar100_test_acc': mean('cifar100', 'x-test'),
          'bench_imagenet16_120_test_acc': mean('ImageNet16-120', 'x-test'),
          'bench_params_M': params, 'bench_flops_M': flops}


@pytest.mark.parametrize('kind', ['folder', 'file'])
def test_record_of_a_known_arch(bench_paths, kind):
  bench = benchmark.open_benchmark(bench_paths[kind])
  assert len(bench) == 3
  for index in (2, 0):
    record = bench.record(ARCHS[index])
    assert record == pytest.approx(expected_record(index), abs=1e-12)
  # Cell 2: CIFAR-10 valid 82%, test 92%, CIFAR-100 test 60%, ImageNet16-120 39%.
  assert bench.record(ARCHS[2])['bench_cifar10_valid_acc'] == pytest.approx(0.82)
  assert bench.record(ARCHS[2])['bench_imagenet16_120_test_acc'] == pytest.approx(0.39)
  assert bench.record(ARCHS[2])['bench_params_M'] == pytest.approx(1.1)


def test_each_cell_is_read_once_and_not_kept(bench_paths, tmp_path):
  """A search asks every epoch: a cell's file is read once, and nats_bench's
  copy of its curves is dropped (the folder form reads cells on demand)."""
  folder = tmp_path / 'NATS-tss-v1_0-3ffb9-simple'
  folder.mkdir()
  for name in ('meta', '000000', '000001'):
    os.link(os.path.join(bench_paths['folder'], f'{name}.pickle.pbz2'),
            folder / f'{name}.pickle.pbz2')
  bench = benchmark.open_benchmark(str(folder))
  first = bench.record(ARCHS[1])
  assert not bench._api.arch2infos_dict
  os.remove(folder / '000001.pickle.pbz2')
  assert bench.record(ARCHS[1]) == first
  assert bench.record(ARCHS[0]) == pytest.approx(expected_record(0), abs=1e-12)


def test_record_reads_the_200_epoch_runs(bench_paths):
  """The API's default schedule is hp='12'; the record is the 200-epoch one."""
  api = nats_bench.create(bench_paths['folder'], 'topology', fast_mode=True, verbose=False)
  default = api.get_more_info(1, 'cifar10', is_random=False)['test-accuracy']
  record = benchmark.open_benchmark(bench_paths['folder']).record(ARCHS[1])
  assert default == pytest.approx(71.0)
  assert record['bench_cifar10_test_acc'] == pytest.approx(0.91)


def _one_line_error(exc_type, fn, *args):
  with pytest.raises(exc_type) as info:
    fn(*args)
  message = str(info.value)
  assert '\n' not in message and message
  return message


def test_errors_are_one_line(bench_paths, tmp_path):
  root = bench_paths['root']
  assert 'no such file or folder' in _one_line_error(
      FileNotFoundError, benchmark.open_benchmark, str(tmp_path / 'missing'))
  assert 'without meta.pickle.pbz2' in _one_line_error(
      ValueError, benchmark.open_benchmark, str(tmp_path))
  not_bz2 = tmp_path / 'plain.pickle.pbz2'
  not_bz2.write_text('not a benchmark')
  assert 'not a NATS-Bench benchmark file' in _one_line_error(
      ValueError, benchmark.open_benchmark, str(not_bz2))
  # A per-cell file given as the benchmark: a bz2 pickle without the meta keys.
  assert 'not a NATS-Bench benchmark file' in _one_line_error(
      ValueError, benchmark.open_benchmark, os.path.join(bench_paths['folder'],
                                                         '000000.pickle.pbz2'))
  size_space = root / 'NATS-sss-v1_0-50262-simple'
  size_space.mkdir(exist_ok=True)
  pickle_save(meta(['8:8:8:8:8', '64:64:64:64:64']), str(size_space / 'meta.pickle'))
  assert 'not the topology benchmark' in _one_line_error(
      ValueError, benchmark.open_benchmark, str(size_space))

  bench = benchmark.open_benchmark(bench_paths['folder'])
  assert 'malformed NB201 arch string' in _one_line_error(ValueError, bench.record,
                                                          '|nor_conv_3x3~0|+')
  absent = ARCHS[0].replace('skip_connect~2', 'none~2')  # well-formed, not in the tiny benchmark
  assert 'is not a cell' in _one_line_error(ValueError, bench.record, absent)
  # A folder whose cell file is missing (a partly extracted archive).
  partial = root / 'partial'
  partial.mkdir(exist_ok=True)
  pickle_save(meta(ARCHS), str(partial / 'meta.pickle'))
  assert 'cannot be read' in _one_line_error(
      ValueError, benchmark.open_benchmark(str(partial)).record, ARCHS[1])


def test_check_benchmark_flag(bench_paths):
  assert benchmark.check_benchmark_flag('darts', '') is None
  assert benchmark.check_benchmark_flag('nb201', '') is None
  message = _one_line_error(ValueError, benchmark.check_benchmark_flag, 'darts',
                            bench_paths['folder'])
  assert '--space=nb201' in message and 'drop --benchmark_dir' in message
  bench = benchmark.check_benchmark_flag('nb201', bench_paths['folder'])
  assert bench.record(ARCHS[0])['bench_index'] == 0
  # The search space's own cells print as the benchmark's strings.
  from snas_jax.spaces import nb201
  cell = nb201.Arch(('nor_conv_1x1', 'none', 'none', 'none', 'none', 'skip_connect'))
  assert bench.record(str(cell))['bench_index'] == 2
  _one_line_error(FileNotFoundError, benchmark.check_benchmark_flag, 'nb201', '/no/such/folder')


def test_command_line(bench_paths):
  run = lambda *args: subprocess.run([sys.executable, '-m', 'snas_jax.benchmark', *args],
                                     capture_output=True, text=True, cwd=ROOT, timeout=60)
  proc = run(ARCHS[2], f'--benchmark_dir={bench_paths["folder"]}')
  assert proc.returncode == 0, proc.stderr
  assert f'NAS-Bench-201 cell 2: {ARCHS[2]}' in proc.stdout
  for line in ('CIFAR-10 valid (cifar10-valid, x-valid)    82.00%',
               'CIFAR-10 test (cifar10, ori-test)          92.00%',
               'CIFAR-100 test (x-test)                    60.00%',
               'ImageNet16-120 test (x-test)               39.00%',
               'params 1.100 M, FLOPs 90.00 M'):
    assert line in proc.stdout, proc.stdout
  absent = ARCHS[0].replace('skip_connect~2', 'none~2')
  proc = run(absent, f'--benchmark_dir={bench_paths["folder"]}')
  assert proc.returncode == 1 and 'is not a cell' in proc.stderr
  assert proc.stderr.startswith('error: ') and proc.stderr.count('\n') == 1, proc.stderr
