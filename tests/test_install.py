"""The installed package: the checkout's source distribution, built into a
wheel as `pip install snas_jax-*.tar.gz` builds it and installed into a new
virtual environment that cannot see the checkout, holds every file the
package reads at run time (the CPU backend's C++ sources, the flagfiles) and
runs a one-step search through its console script on the native kernels.

The virtual environment sees the running interpreter's packages (jax, flax,
...: no download) through a .pth file, whether the tests run in a virtual
environment or in the system's Python, and the wheel installs with --no-deps from a wheel built with
--no-build-isolation and --no-index, so no step needs a package index. The
kernels come from the shared cache (SNAS_JAX_NATIVE_DIR or its default),
whose key is a hash of the source file's bytes: the installed package reads
its own kernels.cc to compute the key, and the test checks that the file is
byte-identical to the checkout's, so a library in the cache is that file's
build (on a cold cache the installed package compiles it, ~35 s more).
"""
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CACHE_DIR, ROOT, TINY_SEARCH

# Not shipped: caches and build products (dot files are skipped too).
SKIPPED_SUFFIXES = ('.pyc', '.pyo', '.so', '.o')


def backend_module() -> str:
  """The module whose folder holds the CPU backend's C++ sources."""
  return 'snas_jax.backends.cpu.native'


# The search flags that run the CPU backend's native kernels.
NATIVE_FLAGS = ['--backend=cpu']


def package_files(root: Path) -> dict:
  """{path relative to root: sha256} of the files under root that ship
  (links to folders followed, as the build follows them)."""
  out = {}
  for folder, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = [d for d in dirs if d != '__pycache__' and not d.startswith('.')]
    for name in files:
      if not name.startswith('.') and not name.endswith(SKIPPED_SUFFIXES):
        path = Path(folder, name)
        out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def clean_env(**extra) -> dict:
  """os.environ without PYTHONPATH (the checkout must not be importable) and
  without the mark of a restarted entry script (so the script restarts)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'PYTHONHOME', 'SNAS_JAX_MEMORY_TUNED')}
  return dict(env, **extra)


def run(cmd, cwd, timeout=300, **env):
  proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                        env=clean_env(**env), timeout=timeout)
  assert proc.returncode == 0, f'{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}'
  return proc


@pytest.fixture(scope='module')
def venv(tmp_path_factory):
  """The virtual environment's folder, with the wheel of the checkout installed."""
  for module in ('pip', 'setuptools'):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f'cannot build a wheel: {module} is not installed in this Python '
                  '(the build runs without isolation so that it needs no package index)')
  tmp = tmp_path_factory.mktemp('install')
  # The build runs on a copy: setuptools leaves build/ and *.egg-info in the
  # source folder, and a stale build/lib would put files deleted since into
  # the wheel. The copy keeps links (snas_jax/configs -> experiments/configs).
  src = tmp / 'src'
  src.mkdir()
  for entry in Path(ROOT).iterdir():
    if entry.is_file():
      shutil.copy2(entry, src)
  for folder in ('snas_jax', 'experiments'):
    shutil.copytree(Path(ROOT, folder), src / folder, symlinks=True,
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  run([sys.executable, '-c', 'import sys; from setuptools import build_meta; '
       'build_meta.build_sdist(sys.argv[1])', tmp / 'sdist'], cwd=src)
  sdist, = (tmp / 'sdist').glob('snas_jax-*.tar.gz')
  run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
       '--wheel-dir', tmp / 'dist', sdist], cwd=tmp)
  wheel, = (tmp / 'dist').glob('snas_jax-*.whl')
  run([sys.executable, '-m', 'venv', '--without-pip', tmp / 'venv'], cwd=tmp)
  # The running interpreter's package folders, after the venv's own (lines
  # of a .pth file are appended to sys.path; the checkout is not among them).
  purelib = run([tmp / 'venv' / 'bin' / 'python', '-c',
                 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], cwd=tmp)
  folders = [p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')]
  Path(purelib.stdout.strip(), 'running_interpreter.pth').write_text('\n'.join(folders) + '\n')
  run([sys.executable, '-m', 'pip', '--python', tmp / 'venv' / 'bin' / 'python', 'install',
       '--no-deps', '--no-index', wheel], cwd=tmp)
  return tmp / 'venv'


INSPECT = """
import hashlib, importlib, importlib.metadata, json, os, pathlib, sys
import snas_jax, snas_jax.scripts
root = pathlib.Path(snas_jax.__file__).parent
files = {{p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
         for p in root.rglob('*') if p.is_file() and '__pycache__' not in p.parts}}
print(json.dumps({{'package': str(root), 'version': snas_jax.__version__,
                  'dist_version': importlib.metadata.version('snas_jax'),
                  'backend': os.path.dirname(importlib.import_module('{backend}').__file__),
                  'configs': snas_jax.scripts.config_names(), 'files': files,
                  'license': [f.name for f in importlib.metadata.files('snas_jax')
                              if f.name.startswith('LICENSE')]}}))
"""


def test_wheel_installs_every_runtime_file(venv, tmp_path):
  import snas_jax
  proc = run([venv / 'bin' / 'python', '-c', INSPECT.format(backend=backend_module())],
             cwd=tmp_path)
  got = json.loads(proc.stdout.splitlines()[-1])
  package = Path(got['package'])
  assert package.is_relative_to(venv), f'snas_jax imported from {package}, not the venv'
  # Every file of the checkout's package, identical (the sources, the flagfiles).
  expected = package_files(Path(ROOT, 'snas_jax'))
  missing = sorted(set(expected) - set(got['files']))
  assert not missing, f'not in the wheel: {missing}'
  assert {k: got['files'][k] for k in expected} == expected
  # The backend's C++ sources sit beside the module that builds them.
  backend = Path(got['backend'])
  assert backend.is_relative_to(package)
  sources = sorted(p.name for p in backend.glob('*.cc'))
  checkout_backend = Path(importlib.import_module(backend_module()).__file__).parent
  assert sources and sources == sorted(p.name for p in checkout_backend.glob('*.cc'))
  assert got['version'] == got['dist_version'] == snas_jax.__version__
  assert got['license'] == ['LICENSE']
  assert got['configs'] == sorted(p.stem for p in Path(ROOT, 'experiments', 'configs').glob('*.flags'))
  for script in ('snas-search', 'snas-train-cifar', 'snas-train-imagenet'):
    assert (venv / 'bin' / script).exists(), script


def test_installed_console_script_runs_a_search_step(venv, tmp_path, cifar_dir):
  """snas-search from another folder: --config read from the package, the
  data found through $SNAS_JAX_DATA_DIR (an installed package has no
  checkout around it), the restart (the CPU backend's memory tuning
  re-executes the console script), the native kernels, one step and its
  checkpoint."""
  proc = run([venv / 'bin' / 'snas-search', '--config=quick', f'--workdir={tmp_path / "w"}',
              *TINY_SEARCH, *NATIVE_FLAGS,
              '--epochs=1', '--stop_after_step=1', f'--compilation_cache_dir={CACHE_DIR}'],
             cwd=tmp_path, timeout=600, SNAS_JAX_DATA_DIR=cifar_dir)
  assert proc.stdout.startswith(
      f'CIFAR-10: npz copy in {os.path.abspath(cifar_dir)} ($SNAS_JAX_DATA_DIR)\n'), proc.stdout
  assert 'stopped after step 1' in proc.stdout
  assert 'kernels unavailable' not in proc.stderr
  assert any((tmp_path / 'w' / 'checkpoints').iterdir())


def test_config_names_a_shipped_flagfile(tmp_path):
  """--config=NAME is --flagfile=<the package's NAME.flags>, in place."""
  from snas_jax import scripts
  quick = scripts.config_path('quick')
  assert quick.read_bytes() == Path(ROOT, 'experiments', 'configs', 'quick.flags').read_bytes()
  assert scripts.config_path('quick.flags') == quick
  assert scripts.expand_config(['prog', '--epochs=1', '--config=quick', '--channels=4']) == [
      'prog', '--epochs=1', f'--flagfile={quick}', '--channels=4']
  assert scripts.expand_config(['prog', '--config', 'quick', '--', '--config=x']) == [
      'prog', f'--flagfile={quick}', '--', '--config=x']
  with pytest.raises(SystemExit, match='no such flagfile; one of .*quick'):
    scripts.expand_config(['prog', '--config=nope'])
  # Only on the command line: inside a flagfile it is an error, not ignored.
  (tmp_path / 'f.flags').write_text('--config=quick\n')
  proc = subprocess.run([sys.executable, str(Path(ROOT, 'experiments', 'train_cifar.py')),
                         f'--flagfile={tmp_path / "f.flags"}', '--arch=DARTS_V2', '--summary'],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --config works on the command line only')


def test_installed_studies_read_the_package_files(venv, tmp_path):
  """The study driver from the installed package: Table 1's η levels from the
  shipped flagfiles, each study's settings flagfile and the search's console script."""
  from snas_jax.studies import STUDIES, table1
  code = ('import json; from snas_jax import study; from snas_jax.studies import STUDIES, table1; '
          'print(json.dumps({"checkout": study.IN_CHECKOUT, "etas": [table1.eta(a.name) for a in '
          'table1.ARMS], "settings": {n: s.default_settings().read_text() for n, s in '
          'STUDIES.items()}, "entry": study.search_entry()}))')
  got = json.loads(run([venv / 'bin' / 'python', '-c', code], cwd=tmp_path).stdout.splitlines()[-1])
  assert got['checkout'] is False
  assert got['etas'] == [table1.eta(a.name) for a in table1.ARMS]
  assert got['settings'] == {n: s.default_settings().read_text() for n, s in STUDIES.items()}
  assert got['entry'] == [str(venv / 'bin' / 'snas-search')]
