"""Studies: a grid of (arm, seed) searches on one space, and their report.

A study (``snas_jax/studies/``: ``table1``, ``nb201``) is a value: its arms
(each a name, a label and the search flags that make it, e.g.
``--method=darts``), its seeds, the shipped flagfile of the search setting
every run shares, and its report. ``run_grid`` searches every (arm, seed) in
its own folder ``<workdir>/runs/<arm>/seed<k>``, each in its own process
(``experiments/search_cifar.py`` in a checkout, the ``snas-search`` console
script of an installed package) with the settings flagfile, then the arm's
flags, the seed, the folder and the backend, then the extra flags of the
command line. A finished run (its ``summary.json`` exists) is skipped; an
unfinished one resumes from its checkpoint, so rerunning the command
continues where it stopped. ``<workdir>/<study.output>.json`` records the
commit, the machine and the wall time of every run.

``write_report`` rebuilds ``<docs>/<study.output>.md`` and its figures from
the run folders alone: each run's ``metrics.jsonl`` (one record per epoch),
``summary.json``, ``genotype.json`` and the configuration stored in its
checkpoint (``run_config``).

A study with a retraining flagfile (``Study.retrain``) also trains every
derived cell from scratch once its searches are done
(``experiments/train_cifar.py`` or the ``snas-train-cifar`` console script,
in ``<run>/retrain``, with ``--search_workdir`` and the method's derivation
rule), skipped when its ``final.json`` exists and resumed otherwise.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

# The checkout's root when the package runs from one (docs/ and experiments/
# beside it); an installed package uses its console script and the current folder.
ROOT = Path(__file__).resolve().parents[1]
SEARCH_SCRIPT = ROOT / 'experiments' / 'search_cifar.py'
TRAIN_SCRIPT = ROOT / 'experiments' / 'train_cifar.py'
IN_CHECKOUT = SEARCH_SCRIPT.is_file()
RETRAIN_DIR = 'retrain'  # <run>/retrain: the derived cell trained from scratch
DOCS_DIR = ROOT / 'docs' if IN_CHECKOUT else Path('docs')
REPORT_JSON = 'report.json'


@dataclasses.dataclass(frozen=True)
class Arm:
  """One column of the grid: the search flags that make it (a value may be a
  function, read when the runs start, e.g. from a shipped flagfile)."""
  name: str  # its folder under runs/
  label: str  # its name in the report
  flags: Mapping[str, str | Callable[[], str]]
  color: str  # its colour in the figures

  def search_flags(self) -> dict[str, str]:
    return {k: v() if callable(v) else v for k, v in self.flags.items()}


@dataclasses.dataclass(frozen=True)
class Study:
  """A grid of searches and its report.

  report(results) -> {'markdown': [lines], 'summary': numbers per arm,
  'figures': {name: path}, 'verdicts': [lines]}; ``results`` is a Results.
  """
  name: str  # --study
  output: str  # <docs>/<output>.md, <output>_*.png; <workdir>/<output>.json
  settings: str  # the shipped flagfile (snas_jax/configs) every run shares
  arms: tuple[Arm, ...]
  seeds: tuple[int, ...]
  report: Callable[['Results'], dict]
  # The shipped flagfile of the retraining every derived cell gets after the
  # searches (experiments/train_cifar.py, in <run>/retrain); None: none.
  retrain: str | None = None

  def arm(self, name: str) -> Arm:
    for arm in self.arms:
      if arm.name == name:
        return arm
    raise ValueError(f'unknown arm {name!r} of study {self.name}; choose from '
                     f'{", ".join(a.name for a in self.arms)}')

  def default_settings(self) -> Path:
    """The shipped flagfile of the study's search setting (links resolved)."""
    from snas_jax import scripts
    return scripts.config_path(self.settings).resolve()

  def retrain_settings(self) -> Path:
    """The shipped flagfile of the study's retraining (links resolved)."""
    from snas_jax import scripts
    return scripts.config_path(self.retrain).resolve()

  def state_file(self, workdir: str) -> str:
    return os.path.join(workdir, f'{self.output}.json')


@dataclasses.dataclass
class Results:
  """What a report is made from: the finished runs ({arm: [run, ...]}, a run
  a dict of seed, path, records, summary, genotype, config) and the state file."""
  study: Study
  workdir: str
  docs_dir: str
  runs: dict
  state: dict

  def doc(self, name: str) -> str:
    return os.path.join(self.docs_dir, name)

  def command(self) -> str:
    """The command that rebuilds the report (the workdir relative to the checkout)."""
    shown = os.path.relpath(self.workdir, ROOT) \
        if os.path.abspath(self.workdir).startswith(str(ROOT)) else self.workdir
    return f'python experiments/study.py --study={self.study.name} --workdir={shown} --report'

  def first(self) -> dict:
    return next(iter(self.runs.values()))[0]


def flagfile_value(name: str, flag: str) -> str:
  """The value of ``--flag`` in the shipped flagfile ``name`` (snas_jax/configs)."""
  from snas_jax import scripts
  path = scripts.config_path(name)
  for line in path.read_text().splitlines():
    if line.startswith(f'--{flag}='):
      return line.split('=', 1)[1].strip()
  raise ValueError(f'{path} sets no --{flag}')


def run_dir(workdir: str, arm: str, seed: int) -> str:
  return os.path.join(workdir, 'runs', arm, f'seed{seed}')


def is_finished(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'summary.json'))


def retrain_dir(path: str) -> str:
  return os.path.join(path, RETRAIN_DIR)


def retrain_finished(path: str) -> bool:
  """Whether the run's derived cell has been retrained (its final.json exists)."""
  return os.path.isfile(os.path.join(retrain_dir(path), 'final.json'))


# ----------------------------------------------------------------------------
# Provenance.


def git_commit() -> str:
  """HEAD of the checkout, with '+dirty' when tracked files differ from it."""
  if not IN_CHECKOUT:
    from snas_jax import __version__
    return f'unknown (installed package snas_jax {__version__})'
  try:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown (not a git checkout)'
  return head + ('+dirty' if dirty else '')


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  try:
    from importlib.metadata import version
    jax_version = version('jax')
  except Exception:  # noqa: BLE001 (any metadata failure: leave it out)
    jax_version = 'unknown'
  return {'cpu': cpu, 'cores': os.cpu_count(), 'os': platform.platform(),
          'python': platform.python_version(), 'jax': jax_version}


def read_json(path: str, default=None):
  if not os.path.isfile(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Runs.


def entry(script: Path, console_script: str) -> list[str]:
  """The command that runs an entry script: the checkout's, else the
  installed package's console script."""
  if IN_CHECKOUT:
    return [sys.executable, str(script)]
  found = shutil.which(console_script, path=os.path.dirname(sys.executable)) or shutil.which(
      console_script)
  if found is None:
    raise FileNotFoundError(f'the {console_script} console script is not installed beside '
                            f'{sys.executable} nor on PATH; reinstall snas_jax')
  return [found]


def search_entry() -> list[str]:
  return entry(SEARCH_SCRIPT, 'snas-search')


def search_command(study: Study, settings: str, arm: str, seed: int, workdir: str, backend: str,
                   extra: list[str]) -> list[str]:
  """The search of one (arm, seed): settings flagfile, the arm's flags, then ``extra``."""
  flags = study.arm(arm).search_flags()
  return [*search_entry(), f'--flagfile={settings}',
          *(f'--{k}={v}' for k, v in flags.items()), f'--seed={seed}',
          f'--workdir={run_dir(workdir, arm, seed)}', f'--backend={backend}', *extra]


def retrain_command(study: Study, run: str, config: dict, backend: str) -> list[str]:
  """The retraining of the derived cell of the finished search in ``run``
  (``config``: its configuration): the study's retraining flagfile, then the
  search's space, data set, folder, the method's derivation rule and seed."""
  from snas_jax import methods, spaces
  return [*entry(TRAIN_SCRIPT, 'snas-train-cifar'), f'--flagfile={study.retrain_settings()}',
          f'--space={config.get("space", spaces.DEFAULT)}', f'--dataset={config["dataset"]}',
          f'--search_workdir={run}', f'--derive_rule={methods.get(config["method"]).derivation}',
          f'--seed={config["seed"]}', f'--workdir={retrain_dir(run)}', f'--backend={backend}']


def _run_logged(cmd: list[str], folder: str) -> int:
  """Runs ``cmd`` with its output appended to ``folder``/log.txt; its exit status."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'log.txt'), 'a') as out:
    out.write('$ ' + ' '.join(cmd) + '\n')
    out.flush()
    return subprocess.run(cmd, cwd=ROOT if IN_CHECKOUT else None, stdout=out,
                          stderr=subprocess.STDOUT).returncode


def _failure(key: str, code: int, folder: str) -> RuntimeError:
  with open(os.path.join(folder, 'log.txt')) as f:
    tail = f.read()[-1500:]
  return RuntimeError(f'{key} failed (exit {code}); rerun the command to resume it. '
                      f'End of {os.path.join(folder, "log.txt")}:\n{tail}')


def flag_lines(flagfile_text: str) -> list[str]:
  """The flags of a flagfile's text: its comments and blank lines left out."""
  return [line.strip() for line in flagfile_text.splitlines()
          if line.strip() and not line.strip().startswith('#')]


def run_grid(study: Study, workdir: str, arms: list[str], seeds: list[int],
             settings: str | None = None, backend: str = 'auto', extra: list[str] = (),
             log=print) -> dict:
  """Runs (or resumes, or skips when finished) every (arm, seed) search, then,
  if the study has a retraining flagfile, every derived cell's retraining;
  returns the state. ``settings``: a flagfile (default: the study's shipped one)."""
  settings = settings or str(study.default_settings())
  for arm in arms:
    study.arm(arm)  # a one-line error for an unknown arm, before any run
  if not os.path.isfile(settings):
    raise FileNotFoundError(f'--settings={settings}: no such flagfile')
  workdir, settings = os.path.abspath(workdir), os.path.abspath(settings)  # the runs' cwd differs
  os.makedirs(workdir, exist_ok=True)
  state_path = study.state_file(workdir)
  state = read_json(state_path, {'runs': {}, 'invocations': []})
  settings_text = Path(settings).read_text()
  if (state.get('settings_text') is not None
      and flag_lines(state['settings_text']) != flag_lines(settings_text)) or \
      state.get('extra_flags') not in (None, list(extra)):
    log(f'warning: {workdir} holds runs made with other settings; a finished run is kept as it '
        f'is, an unfinished one refuses to resume with other flags')
  state.update(study=study.name, settings=settings, settings_text=settings_text,
               extra_flags=list(extra), arms=list(arms), seeds=list(seeds))
  commit = git_commit()
  invocation = {'start': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                'commit': commit, 'machine': machine(), 'wall_s': 0.0}
  state['invocations'].append(invocation)
  write_json(state_path, state)
  t_start = time.time()
  pairs = [(a, s) for a in arms for s in seeds]

  def run(i: int, key: str, folder: str, finished: Callable[[], bool],
          command: Callable[[], list[str]], doing: str, result: Callable[[], str]) -> None:
    """Job i of the phase: skipped when finished, else run, accounted and checked."""
    tag = f'[{i}/{len(pairs)}] {key}'
    if finished():
      log(f'{tag}: finished, skipped')
      return
    cmd = command()
    log(f'{tag}: {doing} (log: {os.path.join(folder, "log.txt")})')
    t0 = time.time()
    code = _run_logged(cmd, folder)
    entry_ = state['runs'].setdefault(key, {'wall_s': 0.0, 'commits': []})
    entry_['wall_s'] += time.time() - t0
    if commit not in entry_['commits']:
      entry_['commits'].append(commit)
    invocation['wall_s'] = time.time() - t_start
    write_json(state_path, state)
    if code != 0 or not finished():
      raise _failure(key, code, folder)
    log(f'{tag}: done in {time.time() - t0:.0f} s, {result()}')

  for i, (arm, seed) in enumerate(pairs, 1):
    path = run_dir(workdir, arm, seed)
    run(i, f'{arm}/seed{seed}', path, lambda: is_finished(path),
        lambda: search_command(study, settings, arm, seed, workdir, backend, list(extra)),
        'searching', lambda: 'child test accuracy {:.2f}%'.format(
            100 * read_json(os.path.join(path, 'summary.json'))['child_test_acc']))
  # The derived cells trained from scratch, once every search is done.
  for i, (arm, seed) in enumerate(pairs if study.retrain else [], 1):
    path = run_dir(workdir, arm, seed)
    run(i, f'{arm}/seed{seed}/{RETRAIN_DIR}', retrain_dir(path), lambda: retrain_finished(path),
        lambda: retrain_command(study, path, run_config(path), backend),
        'training the derived cell', lambda: 'test error {:.2f}%'.format(
            read_json(os.path.join(retrain_dir(path), 'final.json'))['test_error']))
  invocation['wall_s'] = time.time() - t_start
  write_json(state_path, state)
  return state


# ----------------------------------------------------------------------------
# Reading the run folders.


def epoch_records(path: str) -> list[dict]:
  """The per-epoch records of a run's metrics.jsonl, one per epoch (the last
  written wins), in epoch order."""
  from snas_jax import reporting
  by_epoch = {}
  for r in reporting.read_metrics(path):
    if 'search_val_acc' in r and 'child_acc' in r:
      by_epoch[int(r['epoch'])] = r
  return [by_epoch[e] for e in sorted(by_epoch)]


def run_config(path: str) -> dict:
  """The search configuration stored in a run's checkpoint (the one place that
  reads the checkpoint's metadata)."""
  from snas_jax import checkpoint
  return checkpoint.Checkpointer(path, read_only=True).restore_meta()['config']


def run_genotype(path: str, config: dict, summary: dict) -> dict:
  """The derived cell of a run: the summary's genotype (its method's own
  rule), else genotype.json's entry of the method's DARTS-space rule."""
  if 'genotype' in summary:
    return summary['genotype']
  from snas_jax import methods
  return read_json(os.path.join(path, 'genotype.json'))[methods.get(config['method']).derivation]


def load_runs(study: Study, workdir: str) -> dict:
  """{arm: [run, ...]} of every finished run under ``workdir/runs``, arms in
  the study's order, seeds in increasing order."""
  out = {}
  for arm in study.arms:
    folder = os.path.join(workdir, 'runs', arm.name)
    if not os.path.isdir(folder):
      continue
    runs = []
    for name in sorted(os.listdir(folder), key=lambda n: (len(n), n)):
      path = os.path.join(folder, name)
      if not (name.startswith('seed') and is_finished(path)):
        continue
      config = run_config(path)
      summary = read_json(os.path.join(path, 'summary.json'))
      runs.append({'seed': int(name[4:]), 'path': path, 'records': epoch_records(path),
                   'summary': summary, 'genotype': run_genotype(path, config, summary),
                   'config': config,
                   'retrain': read_json(os.path.join(retrain_dir(path), 'final.json')),
                   'retrain_config': run_config(retrain_dir(path)) if retrain_finished(path)
                   else None})
    if runs:
      out[arm.name] = runs
  return out


def mean_sd(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(runs: dict, final_numbers: Callable[[dict], dict]) -> dict:
  """{arm: {'seeds': [...], 'per_seed': {key: [...]}, key: (mean, sd)}} of
  ``final_numbers(run)`` over each arm's seeds; a key some runs lack is left out."""
  out = {}
  for arm, arm_runs in runs.items():
    finals = [final_numbers(r) for r in arm_runs]
    keys = [k for k in finals[0] if all(k in f for f in finals)]
    per_seed = {k: [f[k] for f in finals] for k in keys}
    out[arm] = {'seeds': [r['seed'] for r in arm_runs], 'per_seed': per_seed,
                **{k: mean_sd(v) for k, v in per_seed.items()}}
  return out


def pct(ms) -> str:
  mean, sd = ms
  return f'{100 * mean:.2f} ± {100 * sd:.2f}'


def pp(ms) -> str:
  mean, sd = ms
  return f'{100 * mean:+.2f} ± {100 * sd:.2f}'


def num(ms, digits=0) -> str:
  mean, sd = ms
  return f'{mean:,.{digits}f} ± {sd:,.{digits}f}'


# ----------------------------------------------------------------------------
# Figures and shared report sections.


def plot_curves(results: Results, panels: list, path: str) -> str:
  """Per-epoch mean (line) and min-max over seeds (band) of every arm, one
  panel per (title, [(fn(record), line style, labelled)], decorate(ax) or None)."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator
  from snas_jax import reporting
  fig = Figure(figsize=(12, 4.25 * ((len(panels) + 1) // 2)), dpi=110)
  for i, (title, series, decorate) in enumerate(panels):
    ax = fig.add_subplot((len(panels) + 1) // 2, 2, i + 1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('epoch')
    for arm, arm_runs in results.runs.items():
      n = min(len(r['records']) for r in arm_runs)
      epochs = np.arange(1, n + 1)
      for fn, style, labelled in series:
        y = np.array([[fn(rec) for rec in r['records'][:n]] for r in arm_runs])
        color = results.study.arm(arm).color
        ax.plot(epochs, y.mean(0), style, color=color, marker='.',
                label=f'{results.study.arm(arm).label} (n={len(arm_runs)})' if labelled else None)
        ax.fill_between(epochs, y.min(0), y.max(0), color=color, alpha=0.15, linewidth=0)
    if decorate:
      decorate(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return reporting.save_figure(fig, path)


def _fmt_setting(value) -> str:
  return f'{value:g}' if isinstance(value, float) else str(value)


def setting_lines(results: Results, reference: Mapping, reasons: Mapping,
                  per_run_fields: set, config: str = 'config') -> list[str]:
  """Rows ``| `--flag` | here | reference | why |`` of the first run's
  configuration (``config``: its search's, or 'retrain_config') where it differs
  from ``reference`` (fields it names), then a warning if another run used another setting."""
  cfg = results.first()[config]
  out = []
  for name, value in cfg.items():
    if name in per_run_fields or name not in reference or reference[name] == value:
      continue
    out.append(f'| `--{name}` | {_fmt_setting(value)} | {_fmt_setting(reference.get(name))} | '
               f'{reasons.get(name, "")} |')
  shared = lambda c: {k: v for k, v in c.items() if k not in per_run_fields}
  other = [a for a in results.runs for r in results.runs[a] if shared(r[config]) != shared(cfg)]
  if other:
    out += ['', f'**Warning**: runs of {sorted(set(other))} used another setting than the first '
            'run.']
  return out


def shown_path(path) -> str:
  """``path`` relative to the checkout of this repository that holds it (the
  runs may have come from another checkout), else relative to this one."""
  path = Path(path).resolve()
  for parent in path.parents:
    if (parent / 'snas_jax').is_dir() and (parent / 'experiments').is_dir():
      return str(path.relative_to(parent))
  return os.path.relpath(path, ROOT)


def settings_shown(results: Results) -> str:
  """The settings flagfile the runs used, relative to its checkout."""
  return shown_path(results.state.get('settings', str(results.study.default_settings())))


def retrain_settings_shown(results: Results) -> str:
  """The retraining flagfile of the study, relative to the checkout."""
  return shown_path(results.study.retrain_settings())


def provenance(results: Results) -> tuple[list[str], list[str], float]:
  """(the provenance lines, the commits the runs used, their summed wall time in s)."""
  state, runs = results.state, results.runs
  searches = {k: r for k, r in state.get('runs', {}).items() if not k.endswith(f'/{RETRAIN_DIR}')}
  retrains = {k: r for k, r in state.get('runs', {}).items() if k.endswith(f'/{RETRAIN_DIR}')}
  commits = sorted({c for r in searches.values() for c in r.get('commits', [])})
  retrain_commits = sorted({c for r in retrains.values() for c in r.get('commits', [])})
  run_wall = sum(r.get('wall_s', 0.0) for r in searches.values())
  retrain_wall = sum(r.get('wall_s', 0.0) for r in retrains.values())
  search_s = sum(r['summary'].get('elapsed_s', 0.0) for a in runs for r in runs[a])
  machines = []
  for inv in state.get('invocations', []):
    m = inv.get('machine', {})
    desc = f'{m.get("cpu", "?")}, {m.get("cores", "?")} cores, {m.get("os", "?")}, ' \
           f'Python {m.get("python", "?")}, JAX {m.get("jax", "?")}'
    if desc not in machines:
      machines.append(desc)
  lines = [f'- Commit(s) the runs used: {", ".join(f"`{c}`" for c in commits) or "not recorded"}'
           + (' (**more than one**: the runs mix code versions)' if len(commits) > 1 else '')
           + (f'; the retrainings: {", ".join(f"`{c}`" for c in retrain_commits)}'
              + (' (**more than one**)' if len(retrain_commits) > 1 else '')
              if retrain_commits else ''),
           f'- Machine: {"; ".join(machines) or "not recorded"}',
           f'- Wall time of the runs (each search process, start to end, summed over resumes): '
           f'{run_wall / 60:.1f} min; of the driver invocations: '
           f'{sum(i.get("wall_s", 0.0) for i in state.get("invocations", [])) / 60:.1f} min; '
           f'inside the searches (steps, evaluations, checkpoints): {search_s / 60:.1f} min'
           + (f'; of the retrainings (each process, summed over resumes): {retrain_wall / 60:.1f} '
              'min' if retrain_wall else ''),
           f'- Started {state["invocations"][0]["start"] if state.get("invocations") else "?"}; '
           f'{sum(len(v) for v in runs.values())} finished runs', '']
  return lines, commits, run_wall


def write_report(study: Study, workdir: str, docs_dir: str = str(DOCS_DIR)) -> dict:
  """Rebuilds ``<docs_dir>/<study.output>.md`` and its PNGs from ``workdir``'s
  finished runs; returns the numbers (also written to ``<workdir>/report.json``)."""
  runs = load_runs(study, workdir)
  if not runs:
    raise ValueError(f'{workdir} holds no finished run of study {study.name}; run the study first')
  state = read_json(study.state_file(workdir), {'runs': {}, 'invocations': []})
  os.makedirs(docs_dir, exist_ok=True)
  results = Results(study, workdir, docs_dir, runs, state)
  report = study.report(results)
  md_path = results.doc(f'{study.output}.md')
  with open(md_path + '.tmp', 'w') as f:
    f.write('\n'.join(report['markdown']))
  os.replace(md_path + '.tmp', md_path)
  _, commits, run_wall = provenance(results)
  result = {'summary': report['summary'], 'markdown': md_path, 'figures': report['figures'],
            'verdicts': report['verdicts'], 'commits': commits, 'run_wall_s': run_wall}
  write_json(os.path.join(workdir, REPORT_JSON), result)
  return result
