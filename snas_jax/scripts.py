"""The entry scripts: ``experiments/*.py`` in a checkout and the console
scripts of an installed package (``snas-search``, ``snas-train-cifar``,
``snas-train-imagenet``) call these functions.

Each defines its config's flags and the runtime flags, then runs
``cli.main``. ``--config=NAME`` names a flagfile shipped with the package
(``snas_jax/configs``, a link to ``experiments/configs`` in a checkout):
``--config=quick`` reads the same file as
``--flagfile=experiments/configs/quick.flags``, from any folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().with_name('configs')


def config_names() -> list[str]:
  """The flagfiles ``--config`` accepts, without their '.flags'."""
  return sorted(p.stem for p in CONFIG_DIR.glob('*.flags'))


def config_path(name: str) -> Path:
  """The shipped flagfile called ``name`` ('quick' or 'quick.flags')."""
  path = CONFIG_DIR / (name if name.endswith('.flags') else f'{name}.flags')
  if not path.is_file():
    raise SystemExit(f'error: --config={name}: no such flagfile; one of '
                     f'{", ".join(config_names())} (or --flagfile=PATH)')
  return path


def expand_config(argv: list[str]) -> list[str]:
  """argv with every ``--config=NAME`` / ``--config NAME`` replaced in place
  by ``--flagfile=<its path>``, so that later flags override the file's."""
  out, args = [], iter(argv)
  for arg in args:
    if arg in ('--config', '-config'):
      name = next(args, None)
      if name is None:
        raise SystemExit('error: --config needs a name: ' + ', '.join(config_names()))
      out.append(f'--flagfile={config_path(name)}')
    elif arg.startswith(('--config=', '-config=')):
      out.append(f'--flagfile={config_path(arg.split("=", 1)[1])}')
    elif arg == '--':
      out += [arg, *args]
    else:
      out.append(arg)
  return out


def _define_config_flag() -> None:
  from absl import flags
  flags.DEFINE_string('config', None, 'A flagfile shipped with snas_jax, by name: '
                      f'{", ".join(config_names())}. Same as --flagfile=<its path> (read in '
                      'place: later flags override it); command line only.')


def _run(main) -> None:
  """absl's app.run on sys.argv with --config expanded (in sys.argv too, so a
  restarted process (the CPU backend's memory tuning) reads the same flags)."""
  from absl import app, flags

  def checked(argv):
    if flags.FLAGS.config is not None:  # only from inside a flagfile
      raise SystemExit('error: --config works on the command line only; in a flagfile '
                       'use --flagfile=PATH')
    main()

  sys.argv[:] = expand_config(sys.argv)
  app.run(checked)


def search_cifar() -> None:
  """Searches a CIFAR-10 cell with SNAS (or the single-level DARTS baseline)."""
  from snas_jax import cli, config, search
  config.define_flags(search.SearchConfig)
  cli.define_runtime_flags()
  _define_config_flag()
  _run(lambda: cli.main(search.run, search.SearchConfig))


def train_cifar() -> None:
  """Retrains a derived cell from scratch on CIFAR-10 and reports its test error."""
  from snas_jax import cli, config, train
  config.define_flags(train.TrainConfig)
  cli.define_runtime_flags(summary=True)
  _define_config_flag()
  _run(lambda: cli.main(train.train_and_evaluate, train.TrainConfig, train.print_summary))


def train_imagenet() -> None:
  """Retrains a derived cell on ImageNet, mobile setting; reports top-1 / top-5 error."""
  from absl import flags
  from snas_jax import cli, config, train
  config.define_flags(train.TrainConfig)
  for name, value in train.IMAGENET_DEFAULTS.items():
    flags.FLAGS.set_default(name, value)
  cli.define_runtime_flags(summary=True)
  _define_config_flag()
  _run(lambda: cli.main(train.train_and_evaluate, train.TrainConfig, train.print_summary))
