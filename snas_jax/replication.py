"""The replication of SNAS's central claim at CPU scale: runs and report.

SNAS's Table 1 (docs/algorithm.md §6): the child derived from a SNAS search
keeps the search's validation accuracy without finetuning (88.54% in search,
90.67% child), while the child derived from a single-level DARTS search drops
(87.67% -> 54.66%); a stronger resource constraint (docs/algorithm.md §4)
gives sparser, cheaper cells.

``run_all`` searches every (method, seed) pair of ``METHODS`` in its own
folder ``<workdir>/runs/<method>/seed<k>``, each in its own process
(``experiments/search_cifar.py`` in a checkout, the ``snas-search`` console
script of an installed package, with the settings flagfile, default the
shipped ``replication.flags``, plus the method's flags). A
finished run (its ``summary.json`` exists) is skipped; an unfinished one
resumes from its checkpoint, so rerunning the command continues where it
stopped. ``<workdir>/replication.json`` records the commit, the machine and
the wall time of every run.

``write_report`` rebuilds ``docs/replication.md`` and its figures from the run
folders alone: each run's ``metrics.jsonl`` (one record per epoch),
``summary.json`` (the child's test accuracy), ``genotype.json`` and the
configuration stored in its checkpoint.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The checkout's root when the package runs from one (docs/ and experiments/
# beside it); an installed package uses its console script and the current folder.
ROOT = Path(__file__).resolve().parents[1]
SEARCH_SCRIPT = ROOT / 'experiments' / 'search_cifar.py'
IN_CHECKOUT = SEARCH_SCRIPT.is_file()
DOCS_DIR = ROOT / 'docs' if IN_CHECKOUT else Path('docs')
STATE_FILE = 'replication.json'
REPORT_JSON = 'report.json'
PREFIX = 'replication'  # file names in the docs folder: replication.md, replication_*.png


def default_settings() -> Path:
  """The shipped flagfile of the replication's search setting (links resolved)."""
  from snas_jax import scripts
  return scripts.config_path('replication').resolve()


def _flagfile_value(name: str, flag: str) -> str:
  """The value of ``--flag`` in the shipped flagfile ``name`` (snas_jax/configs)."""
  from snas_jax import scripts
  path = scripts.config_path(name)
  for line in path.read_text().splitlines():
    if line.startswith(f'--{flag}='):
      return line.split('=', 1)[1].strip()
  raise ValueError(f'{path} sets no --{flag}')


# Each method: its search method, a label and its η: the shipped flagfile it
# is read from (docs/algorithm.md §4), or a value; DARTS is the single-level
# baseline, Z = softmax(α), DARTS derivation (docs/algorithm.md §2, §6).
METHODS = {
    'snas_none': {'label': 'SNAS, no constraint', 'method': 'snas', 'eta_flagfile': 'snas_none'},
    'snas_moderate': {'label': 'SNAS, moderate constraint', 'method': 'snas',
                      'eta_flagfile': 'snas_moderate'},
    'snas_aggressive': {'label': 'SNAS, aggressive constraint', 'method': 'snas',
                        'eta_flagfile': 'snas_aggressive'},
    'darts': {'label': 'DARTS (single-level, softmax mixture)', 'method': 'darts', 'eta': '0'},
}


def eta(method: str) -> str:
  """The resource_eta of ``method``, as its flagfile writes it (read when first needed)."""
  spec = METHODS[method]
  return spec['eta'] if 'eta' in spec else _flagfile_value(spec['eta_flagfile'], 'resource_eta')


def method_flags(method: str) -> dict:
  return {'method': METHODS[method]['method'], 'resource_eta': eta(method)}

def _final_tau(method: str, s: dict) -> str | None:
  """The final τ, formatted; None for DARTS, which mixes by softmax(α) and samples nothing."""
  return f'{s["tau"][0]:.3f}' if METHODS[method]['method'] == 'snas' else None


# Table 1 of the paper: search validation accuracy -> child accuracy without
# finetuning (%).
PAPER = {'snas_none': (88.54, 90.67), 'darts': (87.67, 54.66)}
# What the report calls keeping / losing accuracy: the mean child-minus-search
# gap over seeds, in percentage points.
KEEP_PP = -2.0
DROP_PP = -10.0


def run_dir(workdir: str, method: str, seed: int) -> str:
  return os.path.join(workdir, 'runs', method, f'seed{seed}')


def is_finished(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'summary.json'))


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


def _read_json(path: str, default=None):
  if not os.path.isfile(path):
    return default
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Runs.


def search_command(settings: str, method: str, seed: int, workdir: str, backend: str,
                   extra: list[str]) -> list[str]:
  """The search of one (method, seed): settings flagfile, method flags, then ``extra``."""
  flags = method_flags(method)
  return [*search_entry(), f'--flagfile={settings}',
          *(f'--{k}={v}' for k, v in flags.items()), f'--seed={seed}',
          f'--workdir={run_dir(workdir, method, seed)}', f'--backend={backend}', *extra]


def search_entry() -> list[str]:
  """The command that runs a search: the checkout's script, else the
  installed package's console script."""
  if IN_CHECKOUT:
    return [sys.executable, str(SEARCH_SCRIPT)]
  script = shutil.which('snas-search', path=os.path.dirname(sys.executable)) or shutil.which(
      'snas-search')
  if script is None:
    raise FileNotFoundError('the snas-search console script is not installed beside '
                            f'{sys.executable} nor on PATH; reinstall snas_jax')
  return [script]


def run_all(workdir: str, methods: list[str], seeds: list[int], settings: str | None = None,
            backend: str = 'auto', extra: list[str] = (), log=print) -> dict:
  """Runs (or resumes, or skips when finished) every (method, seed) search; returns the state.
  ``settings``: a flagfile (default: the shipped replication.flags)."""
  settings = settings or str(default_settings())
  unknown = set(methods) - set(METHODS)
  if unknown:
    raise ValueError(f'unknown --methods {sorted(unknown)}; choose from {", ".join(METHODS)}')
  if not os.path.isfile(settings):
    raise FileNotFoundError(f'--settings={settings}: no such flagfile')
  workdir, settings = os.path.abspath(workdir), os.path.abspath(settings)  # the runs' cwd differs
  os.makedirs(workdir, exist_ok=True)
  state_path = os.path.join(workdir, STATE_FILE)
  state = _read_json(state_path, {'runs': {}, 'invocations': []})
  settings_text = Path(settings).read_text()
  if state.get('settings_text') not in (None, settings_text) or \
      state.get('extra_flags') not in (None, list(extra)):
    log(f'warning: {workdir} holds runs made with other settings; a finished run is kept as it '
        f'is, an unfinished one refuses to resume with other flags')
  state.update(settings=os.path.abspath(settings), settings_text=settings_text,
               extra_flags=list(extra), methods=list(methods), seeds=list(seeds))
  commit = git_commit()
  invocation = {'start': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                'commit': commit, 'machine': machine(), 'wall_s': 0.0}
  state['invocations'].append(invocation)
  _write_json(state_path, state)
  t_start = time.time()
  pairs = [(m, s) for m in methods for s in seeds]
  for i, (method, seed) in enumerate(pairs, 1):
    path = run_dir(workdir, method, seed)
    key = f'{method}/seed{seed}'
    tag = f'[{i}/{len(pairs)}] {key}'
    if is_finished(path):
      log(f'{tag}: finished, skipped')
      continue
    os.makedirs(path, exist_ok=True)
    cmd = search_command(settings, method, seed, workdir, backend, list(extra))
    log(f'{tag}: searching (log: {os.path.join(path, "log.txt")})')
    t0 = time.time()
    with open(os.path.join(path, 'log.txt'), 'a') as out:
      out.write('$ ' + ' '.join(cmd) + '\n')
      out.flush()
      proc = subprocess.run(cmd, cwd=ROOT if IN_CHECKOUT else None, stdout=out,
                            stderr=subprocess.STDOUT)
    wall = time.time() - t0
    entry = state['runs'].setdefault(key, {'wall_s': 0.0, 'commits': []})
    entry['wall_s'] += wall
    if commit not in entry['commits']:
      entry['commits'].append(commit)
    invocation['wall_s'] = time.time() - t_start
    _write_json(state_path, state)
    if proc.returncode != 0 or not is_finished(path):
      with open(os.path.join(path, 'log.txt')) as f:
        tail = f.read()[-1500:]
      raise RuntimeError(f'{key} failed (exit {proc.returncode}); rerun the command to resume it. '
                         f'End of {os.path.join(path, "log.txt")}:\n{tail}')
    summary = _read_json(os.path.join(path, 'summary.json'))
    log(f'{tag}: done in {wall:.0f} s, child test accuracy {100 * summary["child_test_acc"]:.2f}%')
  invocation['wall_s'] = time.time() - t_start
  _write_json(state_path, state)
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
  """The search configuration stored in a run's checkpoint."""
  from snas_jax import checkpoint
  return checkpoint.Checkpointer(path, read_only=True).restore_meta()['config']


def none_edges(genotype: dict) -> int:
  """Edges of the derived child (normal + reduce, 28 in all) that are `none`."""
  from snas_jax import genotypes
  kept = sum(1 for cell in ('normal', 'reduce') for node in genotype[cell]
             for op, _ in node if op != 'none')
  return 2 * genotypes.NUM_EDGES - kept


def load_runs(workdir: str) -> dict:
  """{method: [run, ...]} of every finished run under ``workdir/runs``; a run is
  a dict of seed, records, summary, genotype (its method's rule), config."""
  out = {}
  for method in METHODS:
    folder = os.path.join(workdir, 'runs', method)
    if not os.path.isdir(folder):
      continue
    runs = []
    for name in sorted(os.listdir(folder), key=lambda n: (len(n), n)):
      path = os.path.join(folder, name)
      if not (name.startswith('seed') and is_finished(path)):
        continue
      config = run_config(path)
      genotypes_ = _read_json(os.path.join(path, 'genotype.json'))
      runs.append({'seed': int(name[4:]), 'path': path, 'records': epoch_records(path),
                   'summary': _read_json(os.path.join(path, 'summary.json')),
                   'genotype': genotypes_[config['method']], 'config': config})
    if runs:
      out[method] = runs
  return out


def final_numbers(run: dict) -> dict:
  """The Table 1 numbers of one run (accuracies as fractions)."""
  last = run['records'][-1]
  return {'search_val_acc': last['search_val_acc'], 'child_val_acc': last['child_acc'],
          'child_test_acc': run['summary']['child_test_acc'],
          'gap': last['child_acc'] - last['search_val_acc'],
          'child_params': last['child_params'], 'child_flops': last['child_flops'],
          'none_edges': none_edges(run['genotype']),
          'alpha_entropy_normal': last['alpha_entropy_normal'],
          'alpha_entropy_reduce': last['alpha_entropy_reduce'], 'tau': last['tau'],
          'epochs': len(run['records'])}


def mean_sd(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(runs: dict) -> dict:
  """{method: {'seeds': [...], 'per_seed': {key: [...]}, key: (mean, sd)}}."""
  out = {}
  for method, method_runs in runs.items():
    finals = [final_numbers(r) for r in method_runs]
    per_seed = {k: [f[k] for f in finals] for k in finals[0]}
    out[method] = {'seeds': [r['seed'] for r in method_runs], 'per_seed': per_seed,
                   **{k: mean_sd(v) for k, v in per_seed.items()}}
  return out


# ----------------------------------------------------------------------------
# Figures.


def _colors():
  return {'snas_none': 'tab:blue', 'snas_moderate': 'tab:green', 'snas_aggressive': 'tab:purple',
          'darts': 'tab:red'}


def plot_curves(runs: dict, path: str) -> str:
  """Per-epoch mean (line) and min-max over seeds (band): search validation,
  child validation, their gap, α entropy (normal solid, reduce dashed)."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator
  from snas_jax import reporting
  panels = [('search validation accuracy (%)', lambda r: 100 * r['search_val_acc']),
            ('derived child, no finetuning: validation accuracy (%)', lambda r: 100 * r['child_acc']),
            ('child − search (percentage points)',
             lambda r: 100 * (r['child_acc'] - r['search_val_acc'])),
            ('α entropy (normal solid, reduce dashed; max ln 8)', None)]
  fig = Figure(figsize=(12, 8.5), dpi=110)
  for i, (title, value) in enumerate(panels):
    ax = fig.add_subplot(2, 2, i + 1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('epoch')
    series = [(value, '-', True)] if value else [
        (lambda r: r['alpha_entropy_normal'], '-', True), (lambda r: r['alpha_entropy_reduce'], '--', False)]
    for method, method_runs in runs.items():
      n = min(len(r['records']) for r in method_runs)
      epochs = np.arange(1, n + 1)
      for fn, style, labelled in series:
        y = np.array([[fn(rec) for rec in r['records'][:n]] for r in method_runs])
        color = _colors()[method]
        ax.plot(epochs, y.mean(0), style, color=color, marker='.',
                label=f'{METHODS[method]["label"]} (n={len(method_runs)})' if labelled else None)
        ax.fill_between(epochs, y.min(0), y.max(0), color=color, alpha=0.15, linewidth=0)
    if value is None:
      ax.axhline(math.log(8), color='0.5', linewidth=0.8, linestyle=':')
    if i == 2:
      ax.axhline(0, color='0.3', linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return reporting._save_figure(fig, path)  # noqa: SLF001 (the module's atomic PNG writer)


def plot_constraint(runs: dict, summary: dict, path: str) -> str:
  """η against the child's cell parameters, FLOPs and `none` edges (SNAS runs;
  each seed a dot, mean ± sd a bar)."""
  from matplotlib.figure import Figure
  from snas_jax import reporting
  snas = [m for m in runs if runs[m][0]['config']['method'] == 'snas']
  etas = {m: float(runs[m][0]['config']['resource_eta']) for m in snas}
  order = sorted(snas, key=lambda m: etas[m])
  fig = Figure(figsize=(13, 3.8), dpi=110)
  for i, (key, title) in enumerate((('child_params', 'child cell parameters'),
                                    ('child_flops', 'child cell FLOPs'),
                                    ('none_edges', 'child `none` edges (of 28)'))):
    ax = fig.add_subplot(1, 3, i + 1)
    xs = np.arange(len(order))
    for x, m in zip(xs, order):
      vals = summary[m]['per_seed'][key]
      ax.scatter([x] * len(vals), vals, color=_colors()[m], alpha=0.6, s=18)
      mean, sd = summary[m][key]
      ax.errorbar([x + 0.12], [mean], yerr=[sd], fmt='o', color='black', capsize=4)
    ax.set_xticks(xs, labels=[f'η={etas[m]:g}' for m in order])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return reporting._save_figure(fig, path)  # noqa: SLF001


# ----------------------------------------------------------------------------
# The report.

# Why each field of the setting differs from the paper's (SearchConfig's
# defaults are the paper's, docs/algorithm.md §5).
REASONS = {
    'layers': 'compute: the paper\'s 8-cell supernet is far too slow for 12 searches on a 2-core CPU',
    'channels': 'compute: fewer channels per node',
    'image_size': 'compute: area-downsampled CIFAR-10 images, the same 10 classes',
    'num_train_images': 'compute: a class-balanced subset keeps epochs short, so that τ anneals '
                        'over several of them',
    'heldout_images': 'per-epoch validation on training images held out of the search; the test '
                      'set is read once, for the final child',
    'epochs': 'compute; τ and the w learning rate follow the epoch count',
    'tau0': 'a short search cannot spend epochs on near-uniform mixtures unlike any one-hot child',
    'tau_min': 'the samples end nearer to one-hot',
    'w_lr': 'w trains with far fewer steps than in the paper',
    'alpha_lr': 'at the paper\'s 3e-4, α stays at its initial entropy in a short search',
    'batch_size': 'compute',
    'drop_path': 'the paper does not mention drop-path during search',
    'num_eval_images': 'compute: the per-epoch evaluations',
    'num_test_images': 'compute: the final test',
}
# Fields that are not part of the shared setting.
PER_RUN_FIELDS = {'method', 'resource_eta', 'seed', 'data_dir', 'tfds_data_dir', 'backend',
                  'checkpoint_every_steps', 'stop_after_step', 'eval_batch_size', 'remat'}


def _pct(ms) -> str:
  mean, sd = ms
  return f'{100 * mean:.2f} ± {100 * sd:.2f}'


def _pp(ms) -> str:
  mean, sd = ms
  return f'{100 * mean:+.2f} ± {100 * sd:.2f}'


def _num(ms, digits=0) -> str:
  mean, sd = ms
  return f'{mean:,.{digits}f} ± {sd:,.{digits}f}'


def _fmt_setting(value) -> str:
  return f'{value:g}' if isinstance(value, float) else str(value)


def _verdicts(summary: dict) -> list[str]:
  """Agreement with the paper, each sentence computed from the numbers."""
  lines = []
  def gap_line(method, claim):
    s = summary[method]
    mean, sd = s['gap']
    n = len(s['seeds'])
    seeds = ', '.join(f'{100 * g:+.2f}' for g in s['per_seed']['gap'])
    paper_search, paper_child = PAPER[method]
    paper_gap = paper_child - paper_search
    if claim == 'keep':
      verdict = ('**agrees**: the child keeps the search accuracy' if mean * 100 >= KEEP_PP else
                 '**disagrees**: the child loses accuracy against the search')
    else:
      if mean * 100 <= DROP_PP:
        verdict = '**agrees**: the child drops well below the search accuracy'
      elif mean * 100 < KEEP_PP:
        verdict = ('**agrees in direction only**: the child drops, by less than '
                   f'{-DROP_PP:g} points')
      else:
        verdict = '**disagrees**: the child does not drop'
    lines.append(
        f'- {METHODS[method]["label"]}: child − search = {100 * mean:+.2f} ± {100 * sd:.2f} points '
        f'over {n} seed(s) (per seed: {seeds}); paper {paper_search:.2f}% → {paper_child:.2f}% '
        f'({paper_gap:+.2f}). {verdict}.')
  if 'snas_none' in summary:
    gap_line('snas_none', 'keep')
  if 'darts' in summary:
    gap_line('darts', 'drop')
  if 'snas_none' in summary and 'darts' in summary:
    a, b = summary['snas_none'], summary['darts']
    diff = a['gap'][0] - b['gap'][0]
    se = math.sqrt(a['gap'][1] ** 2 / len(a['seeds']) + b['gap'][1] ** 2 / len(b['seeds']))
    clear = se > 0 and diff > 2 * se
    lines.append(
        f'- SNAS gap minus DARTS gap: {100 * diff:+.2f} points (paper {PAPER["snas_none"][1] - PAPER["snas_none"][0] - (PAPER["darts"][1] - PAPER["darts"][0]):+.2f}; '
        f'standard error of the difference {100 * se:.2f}). '
        + ('The ordering agrees with the paper and exceeds twice its standard error.' if clear else
           'The ordering agrees with the paper, within twice its standard error.' if diff > 0 else
           'The ordering **disagrees** with the paper.'))
  for method, s in summary.items():
    tau = _final_tau(method, s)
    lines.append(
        f'- Premises, {METHODS[method]["label"]}: {f"final τ {tau}; " if tau else ""}α entropy '
        f'{math.log(8):.3f} (uniform) at the start, {s["alpha_entropy_normal"][0]:.3f} (normal) and '
        f'{s["alpha_entropy_reduce"][0]:.3f} (reduce) at the end: '
        + ('α moved.' if min(s['alpha_entropy_normal'][0], s['alpha_entropy_reduce'][0])
           < math.log(8) - 0.1 else '**α barely moved**, so the child is close to arbitrary.'))
  snas = sorted((m for m in summary if m.startswith('snas_')),
                key=lambda m: float(eta(m)))
  if len(snas) > 1:
    params = [summary[m]['child_params'][0] for m in snas]
    nones = [summary[m]['none_edges'][0] for m in snas]
    dec = all(x >= y for x, y in zip(params, params[1:]))
    inc = all(x <= y for x, y in zip(nones, nones[1:]))
    lines.append(
        f'- Constraint, η = {", ".join(eta(m) for m in snas)}: mean child cell parameters '
        f'{" → ".join(f"{p:,.0f}" for p in params)}, mean `none` edges '
        f'{" → ".join(f"{x:.1f}" for x in nones)}. '
        + ('Stronger constraints give sparser, cheaper cells, as the paper says.' if dec and inc else
           'Parameters fall with η but `none` edges do not rise monotonically.' if dec else
           '`none` edges rise with η but parameters do not fall monotonically.' if inc else
           'Neither parameters nor `none` edges move monotonically with η: **disagrees** with the '
           'paper\'s direction at this scale.'))
  return lines


def write_report(workdir: str, docs_dir: str = str(DOCS_DIR)) -> dict:
  """Rebuilds ``<docs_dir>/replication.md`` and its PNGs from ``workdir``'s
  finished runs; returns the numbers (also written to ``<workdir>/report.json``)."""
  from snas_jax import reporting
  runs = load_runs(workdir)
  if not runs:
    raise ValueError(f'{workdir} holds no finished run; run the replication first')
  state = _read_json(os.path.join(workdir, STATE_FILE), {'runs': {}, 'invocations': []})
  summary = summarize(runs)
  os.makedirs(docs_dir, exist_ok=True)
  doc = lambda name: os.path.join(docs_dir, name)
  figures = {'curves': plot_curves(runs, doc(f'{PREFIX}_curves.png'))}
  if sum(1 for m in runs if runs[m][0]['config']['method'] == 'snas') > 1:
    figures['constraint'] = plot_constraint(runs, summary, doc(f'{PREFIX}_constraint.png'))
  for method, method_runs in runs.items():
    g = method_runs[0]['genotype']
    for cell in ('normal', 'reduce'):
      name = f'{PREFIX}_cell_{method}_{cell}.png'
      reporting.draw_cell([[tuple(e) for e in node] for node in g[cell]], doc(name),
                          f'{METHODS[method]["label"]}, seed {method_runs[0]["seed"]}: {cell} cell')
      figures[f'cell_{method}_{cell}'] = doc(name)
      dot = doc(name[:-4] + '.dot')
      if os.path.exists(dot):
        os.remove(dot)

  first = next(iter(runs.values()))[0]
  cfg = first['config']
  from snas_jax.search import SearchConfig  # its defaults are the paper's setting
  import dataclasses
  paper = {f.name: f.default for f in dataclasses.fields(SearchConfig)}
  shown = os.path.relpath(workdir, ROOT) if os.path.abspath(workdir).startswith(str(ROOT)) \
      else workdir
  out = ['# Replication: does the derived child keep the search accuracy?', '',
         f'Generated by `python experiments/replicate.py --workdir={shown} --report` from the run '
         'folders; every number below comes from them.', '']
  out += ['SNAS (Table 1 of the paper, docs/algorithm.md §6): the child derived from a SNAS '
          'search keeps the search validation accuracy without finetuning (88.54% → 90.67%), '
          'the child of a single-level DARTS search does not (87.67% → 54.66%); a stronger '
          'resource constraint gives sparser, cheaper cells. Here each method searches with '
          f'{len(first["records"])} epochs and the seeds listed below, in the reduced setting '
          'of the next section; validation is on training images held out of the search, the '
          'test set is read once per run, for the final child.', '']

  out += ['## 1. Table 1 at CPU scale', '',
          'Mean ± sample standard deviation over seeds. Search validation: SNAS with one '
          'Gumbel-softmax sample per evaluation batch at the final τ, DARTS with the softmax '
          'mixture. Child: the derived genotype as one-hot Z (each method\'s own derivation '
          'rule, docs/algorithm.md §6) with the supernet\'s weights and BN statistics, BN in '
          'evaluation mode, no finetuning. Gap = child validation − search validation. Cell '
          'parameters and FLOPs: the derived cells only (stem, preprocessing and head '
          'excluded; `snas_jax/costs.py`). `none` edges: of the 28 edges of the normal and '
          'reduction cells, those the child drops (the DARTS rule keeps 2 per node, so it drops '
          '12 by construction).', '',
          '| method | seeds | search val acc (%) | child val acc (%) | child test acc (%) | gap (points) '
          '| child cell params | child cell FLOPs | `none` edges |',
          '|---|---|---|---|---|---|---|---|---|']
  for method, s in summary.items():
    out.append(f'| {METHODS[method]["label"]} (η = {eta(method)}) | '
               f'{",".join(map(str, s["seeds"]))} | {_pct(s["search_val_acc"])} | '
               f'{_pct(s["child_val_acc"])} | {_pct(s["child_test_acc"])} | {_pp(s["gap"])} | '
               f'{_num(s["child_params"])} | {_num(s["child_flops"])} | {_num(s["none_edges"], 1)} |')
  out += ['', 'Final α entropy (mean over edges; ln 8 = 2.079 is uniform) and τ:', '',
          '| method | α entropy normal | α entropy reduce | final τ |', '|---|---|---|---|']
  for method, s in summary.items():
    out.append(f'| {METHODS[method]["label"]} | {_num(s["alpha_entropy_normal"], 3)} | '
               f'{_num(s["alpha_entropy_reduce"], 3)} | {_final_tau(method, s) or "— (no sampling)"} |')

  out += ['', '## 2. Against the paper', '',
          f'Criteria: the child *keeps* the search accuracy when the mean gap is at least '
          f'{KEEP_PP:g} points, and *drops* when it is below {DROP_PP:g} points (the paper: '
          f'{PAPER["snas_none"][1] - PAPER["snas_none"][0]:+.2f} for SNAS, '
          f'{PAPER["darts"][1] - PAPER["darts"][0]:+.2f} for DARTS). Absolute accuracies are '
          'far below the paper\'s: the network, images and budget are reduced (section 4), '
          'so only the gaps and the directions compare.', '']
  out += _verdicts(summary)

  out += ['', '## 3. Figures', '',
          'Per-epoch curves: mean over seeds (line), min to max over seeds (band).', '',
          f'![curves]({PREFIX}_curves.png)', '']
  if 'constraint' in figures:
    out += ['Constraint effect (SNAS runs): each seed a dot, mean ± sd in black.', '',
            f'![constraint]({PREFIX}_constraint.png)', '']
  out += ['Derived cells, the first seed of each method (`none` edges not drawn):', '']
  for method, method_runs in runs.items():
    out += [f'{METHODS[method]["label"]}, seed {method_runs[0]["seed"]}:', '',
            f'![{method} normal]({PREFIX}_cell_{method}_normal.png)',
            f'![{method} reduce]({PREFIX}_cell_{method}_reduce.png)', '']

  out += ['## 4. The reduced setting', '',
          f'Shared by every run (read from the first run\'s checkpoint; settings flagfile '
          f'`{os.path.relpath(state.get("settings", str(default_settings())), ROOT)}`). '
          'The paper\'s values are `SearchConfig`\'s defaults (docs/algorithm.md §5).', '',
          '| flag | here | paper | why |', '|---|---|---|---|']
  for name, value in cfg.items():
    if name in PER_RUN_FIELDS or paper.get(name) == value:
      continue
    out.append(f'| `--{name}` | {_fmt_setting(value)} | {_fmt_setting(paper.get(name))} | '
               f'{REASONS.get(name, "")} |')
  other = [m for m in runs for r in runs[m]
           if {k: v for k, v in r['config'].items() if k not in PER_RUN_FIELDS}
           != {k: v for k, v in cfg.items() if k not in PER_RUN_FIELDS}]
  if other:
    out += ['', f'**Warning**: runs of {sorted(set(other))} used another setting than the first run.']

  out += ['', '## 5. Provenance', '']
  commits = sorted({c for r in state.get('runs', {}).values() for c in r.get('commits', [])})
  run_wall = sum(r.get('wall_s', 0.0) for r in state.get('runs', {}).values())
  search_s = sum(r['summary'].get('elapsed_s', 0.0) for m in runs for r in runs[m])
  machines = []
  for inv in state.get('invocations', []):
    m = inv.get('machine', {})
    desc = f'{m.get("cpu", "?")}, {m.get("cores", "?")} cores, {m.get("os", "?")}, ' \
           f'Python {m.get("python", "?")}, JAX {m.get("jax", "?")}'
    if desc not in machines:
      machines.append(desc)
  out += [f'- Commit(s) the runs used: {", ".join(f"`{c}`" for c in commits) or "not recorded"}'
          + (' (**more than one**: the runs mix code versions)' if len(commits) > 1 else ''),
          f'- Machine: {"; ".join(machines) or "not recorded"}',
          f'- Wall time of the runs (each search process, start to end, summed over resumes): '
          f'{run_wall / 60:.1f} min; of the driver invocations: '
          f'{sum(i.get("wall_s", 0.0) for i in state.get("invocations", [])) / 60:.1f} min; '
          f'inside the searches (steps, evaluations, checkpoints): {search_s / 60:.1f} min',
          f'- Started {state["invocations"][0]["start"] if state.get("invocations") else "?"}; '
          f'{sum(len(v) for v in runs.values())} finished runs', '']
  md_path = doc(f'{PREFIX}.md')
  with open(md_path + '.tmp', 'w') as f:
    f.write('\n'.join(out))
  os.replace(md_path + '.tmp', md_path)

  numbers = {m: {k: v for k, v in s.items()} for m, s in summary.items()}
  result = {'summary': numbers, 'markdown': md_path, 'figures': figures,
            'verdicts': _verdicts(summary), 'commits': commits, 'run_wall_s': run_wall}
  _write_json(os.path.join(workdir, REPORT_JSON), result)
  return result


# ----------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string('workdir', '', 'Folder of the replication: runs/<method>/seed<k> and '
                      'replication.json.')
  flags.DEFINE_list('methods', list(METHODS), f'Which of {", ".join(METHODS)} to run.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of every method.')
  flags.DEFINE_string('settings', str(default_settings()), 'Flagfile of the search setting every '
                      'run shares; search flags after "--" on the command line override it.')
  flags.DEFINE_string('backend', 'auto', 'The searches\' --backend (auto: the CPU backend on a '
                      'CPU-only host).')
  flags.DEFINE_bool('report', False, 'Only rebuild the report from the finished runs.')
  flags.DEFINE_string('docs_dir', str(DOCS_DIR), 'Where replication.md and its PNGs go.')


def main(argv: list[str]) -> None:
  from absl import flags, logging
  logging.set_verbosity(logging.ERROR)  # Orbax warns about every read-only checkpoint it opens
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    raise SystemExit('error: --workdir is required')
  extra = list(argv[1:])
  try:
    if not FLAGS.report:
      run_all(FLAGS.workdir, FLAGS.methods, [int(s) for s in FLAGS.seeds], FLAGS.settings,
              FLAGS.backend, extra)
    result = write_report(FLAGS.workdir, FLAGS.docs_dir)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'report: {result["markdown"]}')
  for line in result['verdicts']:
    print(line)
