"""Shared test set-up: one persistent XLA cache for the whole session, so the
tiny search network compiles once across the CLI runs of the tests."""
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_DIR = os.path.join(ROOT, '..', 'shared', 'data', 'cifar10')
CACHE_DIR = os.path.join(tempfile.gettempdir(), 'snas_jax_test_xla_cache')

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', CACHE_DIR)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
# On a GPU, the test processes (the pytest workers and the scripts they start)
# share the device: none may take 75% of its memory up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')


def script_command(script, *args, env=None):
  """(argv, env) that run experiments/<script> with the shared compilation
  cache (the tests' scripts run --backend=reference: no memory-tuning restart)."""
  full_env = dict(os.environ, **(env or {}))
  full_env.pop('XLA_FLAGS', None) if env is None or 'XLA_FLAGS' not in env else None
  return ([sys.executable, os.path.join(ROOT, 'experiments', script), *args,
           f'--compilation_cache_dir={CACHE_DIR}'], full_env)


def load_experiment(name: str):
  """experiments/<name>.py as a module (run once per call: an experiment
  script imports torch and defines its flags only when it runs)."""
  import importlib.util
  path = os.path.join(ROOT, 'experiments', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_script(script, *args, env=None, timeout=600):
  """Runs experiments/<script> in a subprocess; returns CompletedProcess."""
  import subprocess
  argv, full_env = script_command(script, *args, env=env)
  return subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=timeout,
                        cwd=ROOT)


@pytest.fixture(scope='session')
def cifar_dir():
  if not os.path.exists(os.path.join(CIFAR_DIR, 'train.npz')):
    pytest.skip(f'local CIFAR-10 copy not found at {CIFAR_DIR}')
  return CIFAR_DIR


def write_tfds_metadata(name: str, data_dir, splits: dict):
  """What a prepared tfds data set has, minus the records ({split: examples}):
  lets tfds.testing.mock_data serve it."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0)
      for split, n in splits.items()]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)


def write_imagenet_metadata(data_dir, examples_per_split: int):
  write_tfds_metadata('imagenet2012', data_dir,
                      {'train': examples_per_split, 'validation': examples_per_split})


# A tiny search through the real CLI (train tests retrain its result), on the
# reference backend (the CPU backend's equality with it is tested in
# tests/cpu_backend). XLA:CPU runs the reference's grouped convolutions
# slowly: 8x8 images (area-downsampled, 8 -> 4 -> 2 through the reductions)
# make a step ~8x cheaper than 32x32.
TINY_SEARCH = ['--channels=4', '--layers=3', '--image_size=8', '--num_train_images=128',
               '--num_eval_images=64', '--num_test_images=64',
               '--batch_size=32', '--eval_batch_size=64', '--epochs=2',
               '--checkpoint_every_steps=2', '--resource_eta=1e-3', '--backend=reference']


def search_args(workdir, data_dir, *extra):
  return (f'--workdir={workdir}', f'--data_dir={data_dir}', *TINY_SEARCH, *extra)


def search_cli(workdir, data_dir, *extra):
  return run_script('search_cifar.py', *search_args(workdir, data_dir, *extra))


@pytest.fixture(scope='session')
def tiny_search_workdir(tmp_path_factory, cifar_dir):
  """A finished tiny search (uninterrupted), shared by the search and train tests."""
  workdir = tmp_path_factory.mktemp('search') / 'full'
  proc = search_cli(workdir, cifar_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


DAMAGE = ('truncated file', 'deleted file', 'garbage metadata')


def damage_checkpoint(step_dir, kind):
  """Damages one checkpoint folder as a disk fault or an interrupted copy would."""
  arrays = [os.path.join(parent, name) for parent, _, names in os.walk(step_dir / 'state')
            for name in names if os.sep + 'd' + os.sep in os.path.join(parent, name)]
  largest = max(arrays, key=os.path.getsize)
  if kind == 'truncated file':
    os.truncate(largest, os.path.getsize(largest) // 2)
  elif kind == 'deleted file':
    os.remove(largest)
  else:
    (step_dir / 'meta' / 'metadata').write_text('{"epoch": 1, "conf')
