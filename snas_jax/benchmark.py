"""NAS-Bench-201 lookups: a cell's trained accuracies from the NATS-Bench
topology benchmark, read with the ``nats_bench`` package (an optional
dependency: ``pip install 'snas_jax[benchmark]'``).

    python -m snas_jax.benchmark '|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|' \\
        --benchmark_dir=$HOME/.torch/NATS-tss-v1_0-3ffb9-simple

The benchmark is NATS-Bench's topology space (``tss``, = NAS-Bench-201),
either the ``NATS-tss-v1_0-3ffb9-simple`` folder (untarred from the
release's ``-simple.tar``: ``meta.pickle.pbz2`` with the 15,625 arch strings
and one ``NNNNNN.pickle.pbz2`` per cell, read when first asked for; opening
it is instant) or the single file ``NATS-tss-v1_0-3ffb9.pickle.pbz2``
(every record read at start-up). Each per-cell record holds one
``ArchResults`` per training schedule, ``hp='12'`` and ``hp='200'``
(epochs); the API's default is '12', the tables of NAS-Bench-201 and
NATS-Bench are the 200-epoch ones, so this module always reads ``hp='200'``.

Which set each accuracy comes from is NATS-Bench's own reading
(``nats_bench/api_topology.py``, ``print_information``, which AutoDL-Projects'
NB201 search scripts print after every epoch via
``api.query_by_arch(arch, '200')``, exps/NATS-algos/search-cell.py; and
``api_utils.remap_dataset_set_names``, which maps ('cifar10', 'valid') to
('cifar10-valid', 'x-valid') and ('cifar10', 'test') to ('cifar10',
'ori-test')):

- CIFAR-10 validation: dataset ``cifar10-valid`` (trained on half of the
  training set), set ``x-valid`` (the other half);
- CIFAR-10 test: dataset ``cifar10`` (trained on the whole training set), set
  ``ori-test`` (the 10,000 test images);
- CIFAR-100 and ImageNet16-120 test: set ``x-test`` (half of the original
  test set; ``x-valid`` is the other half, ``ori-test`` both).

Each figure is the mean over the benchmark's trials (seeds) of the accuracy
after the last epoch (``ArchResults.get_metrics(dataset, set)`` with its
defaults ``iepoch=None``, ``is_random=False``, as ``print_information``).
Params (M) and FLOPs (M) are ``get_compute_costs('cifar10')``: the
NB201 network (C = 16, N = 5) on 32×32 images with 10 classes. Accuracies
are returned as fractions (the benchmark stores percentages), like every
``*_acc`` this package writes.
"""
from __future__ import annotations

import os
import pickle
import re

# What the topology benchmark's arch strings look like, nodes '|<op>~<input>|...|'
# joined by '+' (the size space's read '64:64:64:64:64'). The NB201 space's
# parser (nb201.parse_arch_string) checks the ops and the edges.
_NODE = r'(\|[a-z0-9_]+~[0-9]+)+\|'
TOPOLOGY_ARCH = re.compile(rf'{_NODE}(\+{_NODE})*')

FOLDER_NAME = 'NATS-tss-v1_0-3ffb9-simple'
FILE_NAME = 'NATS-tss-v1_0-3ffb9.pickle.pbz2'
META_FILE = 'meta.pickle.pbz2'
HP = '200'  # the 200-epoch records

BENCHMARK_DIR_HELP = (
    f'NAS-Bench-201 (NATS-Bench topology) benchmark: the {FOLDER_NAME} folder (untarred from '
    f'the NATS-Bench release, github.com/D-X-Y/NATS-Bench) or the {FILE_NAME} file; needs the '
    'nats_bench package.')

# (record key, NATS-Bench dataset, evaluation set), as the module docstring says.
ACCURACIES = (
    ('bench_cifar10_valid_acc', 'cifar10-valid', 'x-valid'),
    ('bench_cifar10_test_acc', 'cifar10', 'ori-test'),
    ('bench_cifar100_test_acc', 'cifar100', 'x-test'),
    ('bench_imagenet16_120_test_acc', 'ImageNet16-120', 'x-test'),
)
COST_DATASET = 'cifar10'

# What reading a file that is not a NATS-Bench pickle raises (bz2, pickle,
# and nats_bench's own checks of the loaded dict).
_READ_ERRORS = (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, TypeError,
                AttributeError, ImportError, IndexError, AssertionError)


def _where_to_get() -> str:
  return (f'give the {FOLDER_NAME} folder (untar {FOLDER_NAME}.tar from the NATS-Bench release, '
          f'github.com/D-X-Y/NATS-Bench) or {FILE_NAME}')


class Benchmark:
  """An open NATS-Bench topology benchmark; ``record(arch_string)`` per cell."""

  def __init__(self, api, path: str):
    self._api = api  # a nats_bench.NATStopology
    self.path = path
    self._records = {}  # arch string -> record: each cell is read once

  def __len__(self) -> int:
    return len(self._api)

  def record(self, arch: str) -> dict:
    """The benchmark's record of one cell: ``bench_index`` (its index),
    ``bench_cifar10_valid_acc``, ``bench_cifar10_test_acc``,
    ``bench_cifar100_test_acc``, ``bench_imagenet16_120_test_acc``
    (fractions; 200-epoch, mean over trials), ``bench_params_M`` and
    ``bench_flops_M`` (CIFAR-10 network). A one-line ValueError for a
    malformed arch string (naming the position) or one not in the benchmark."""
    if arch not in self._records:
      self._records[arch] = self._read(arch)
    return dict(self._records[arch])

  def _read(self, arch: str) -> dict:
    index = self._api.query_index_by_arch(arch) if isinstance(arch, str) else -1
    if index < 0:
      # A malformed string: the space's parser says where (it imports JAX, so only here).
      from snas_jax.spaces import nb201
      nb201.parse_arch_string(arch)
      raise ValueError(f'{arch!r} is not a cell of the NAS-Bench-201 benchmark at {self.path} '
                       f'(it holds {len(self)} of NAS-Bench-201\'s 15,625 cells); '
                       f'{_where_to_get()}')
    try:
      results = self._api.query_by_index(index, hp=HP)  # an ArchResults
      record = {'bench_index': int(index)}
      for key, dataset, eval_set in ACCURACIES:
        record[key] = float(results.get_metrics(dataset, eval_set)['accuracy']) / 100
      costs = results.get_compute_costs(COST_DATASET)
    except _READ_ERRORS as e:
      raise ValueError(f'the record of cell {index} in {self.path} cannot be read ({e}); '
                       f'is the benchmark complete? {_where_to_get()}') from None
    record['bench_params_M'] = float(costs['params'])
    record['bench_flops_M'] = float(costs['flops'])
    if self._api.fast_mode:
      # nats_bench keeps every cell it read from the folder (~9 MB of curves
      # each); a long search would hold dozens. The record is all we need.
      self._api.arch2infos_dict.pop(index, None)
      self._api.evaluated_indexes.discard(index)
    return record


def open_benchmark(path: str) -> Benchmark:
  """Opens the NATS-Bench topology benchmark at ``path`` (the -simple folder
  or the .pickle.pbz2 file), quietly; a one-line ValueError or
  FileNotFoundError for a missing path, a folder or file that is not a
  NATS-Bench benchmark, or the size space (NATS-sss) in place of the
  topology one."""
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f'--benchmark_dir={path}: no such file or folder; {_where_to_get()}')
  folder = os.path.isdir(path)
  if folder and not os.path.isfile(os.path.join(path, META_FILE)):
    raise ValueError(f'--benchmark_dir={path} is a folder without {META_FILE}, not a NATS-Bench '
                     f'archive; {_where_to_get()}')
  try:
    import nats_bench
  except ImportError:
    raise ValueError('--benchmark_dir needs the nats_bench package: pip install '
                     '"snas_jax[benchmark]" (or pip install "nats_bench>=1.8,<2")') from None
  try:
    api = nats_bench.create(path, 'topology', fast_mode=folder, verbose=False)
  except _READ_ERRORS as e:
    what = f'{META_FILE} in --benchmark_dir={path}' if folder else f'--benchmark_dir={path}'
    raise ValueError(f'{what} is not a NATS-Bench benchmark file ({type(e).__name__}: {e}); '
                     f'{_where_to_get()}') from None
  not_topology = next((a for a in api.meta_archs
                       if not (isinstance(a, str) and TOPOLOGY_ARCH.fullmatch(a))), None)
  if not_topology is not None:
    raise ValueError(f'--benchmark_dir={path} is not the topology benchmark (NAS-Bench-201): it '
                     f'holds the architecture {not_topology!r} (the size space NATS-sss has '
                     f'strings like 64:64:64:64:64); {_where_to_get()}')
  return Benchmark(api, path)


def check_benchmark_flag(space: str, path: str) -> Benchmark | None:
  """The --benchmark_dir flag checked (and the benchmark opened) before any
  compile: None when it is empty; a one-line ValueError when it is given
  with a space other than nb201, or as open_benchmark raises."""
  if not path:
    return None
  if space != 'nb201':
    raise ValueError(f'--benchmark_dir is NAS-Bench-201\'s benchmark, for --space=nb201; a '
                     f'--space={space} search has no benchmark: drop --benchmark_dir')
  return open_benchmark(path)


def format_record(arch: str, record: dict) -> str:
  """A record as a few lines of text (accuracies in %)."""
  names = {'bench_cifar10_valid_acc': 'CIFAR-10 valid (cifar10-valid, x-valid)',
           'bench_cifar10_test_acc': 'CIFAR-10 test (cifar10, ori-test)',
           'bench_cifar100_test_acc': 'CIFAR-100 test (x-test)',
           'bench_imagenet16_120_test_acc': 'ImageNet16-120 test (x-test)'}
  lines = [f'NAS-Bench-201 cell {record["bench_index"]}: {arch}',
           '200-epoch accuracies, mean over the benchmark\'s trials:']
  lines += [f'  {names[key]:42s} {100 * record[key]:.2f}%' for key, _, _ in ACCURACIES]
  lines.append(f'params {record["bench_params_M"]:.3f} M, FLOPs {record["bench_flops_M"]:.2f} M '
               '(CIFAR-10 network)')
  return '\n'.join(lines)


def _run(argv) -> None:
  from absl import flags
  if len(argv) != 2:
    raise SystemExit(f'usage: python -m snas_jax.benchmark \'<NB201 arch string>\' '
                     f'--benchmark_dir=<{FOLDER_NAME} folder>')
  # One-line errors as snas_jax.cli.one_line_errors, without importing JAX.
  try:
    benchmark = open_benchmark(flags.FLAGS.benchmark_dir)
    print(format_record(argv[1], benchmark.record(argv[1])))
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None


def main() -> None:
  from absl import app, flags
  flags.DEFINE_string('benchmark_dir', '', BENCHMARK_DIR_HELP)
  app.run(_run)


if __name__ == '__main__':
  main()
