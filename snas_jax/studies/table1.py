"""The replication of SNAS's central claim at CPU scale (docs/replication.md).

SNAS's Table 1 (docs/algorithm.md §6): the child derived from a SNAS search
keeps the search's validation accuracy without finetuning (88.54% in search,
90.67% child), while the child derived from a single-level DARTS search drops
(87.67% -> 54.66%); a stronger resource constraint (docs/algorithm.md §4)
gives sparser, cheaper cells. Four arms on the DARTS space (SNAS at three
constraint levels, DARTS), 3 seeds, the shipped ``replication.flags``:

  python experiments/study.py --study=table1 --workdir=workdirs/replication
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from snas_jax import study as study_lib
from snas_jax.study import Arm, Results, Study, num, pct, pp


def _eta_of(flagfile: str):
  return lambda: study_lib.flagfile_value(flagfile, 'resource_eta')


# Each arm: its search method and its η, read from the shipped flagfile of its
# constraint level (docs/algorithm.md §4); DARTS is the single-level baseline,
# Z = softmax(α), DARTS derivation (docs/algorithm.md §2, §6).
ARMS = (
    Arm('snas_none', 'SNAS, no constraint',
        {'method': 'snas', 'resource_eta': _eta_of('snas_none')}, 'tab:blue'),
    Arm('snas_moderate', 'SNAS, moderate constraint',
        {'method': 'snas', 'resource_eta': _eta_of('snas_moderate')}, 'tab:green'),
    Arm('snas_aggressive', 'SNAS, aggressive constraint',
        {'method': 'snas', 'resource_eta': _eta_of('snas_aggressive')}, 'tab:purple'),
    Arm('darts', 'DARTS (single-level, softmax mixture)',
        {'method': 'darts', 'resource_eta': '0'}, 'tab:red'),
)
LABELS = {a.name: a.label for a in ARMS}


def eta(arm: str) -> str:
  """The resource_eta of ``arm``, as its flagfile writes it (read when first needed)."""
  return next(a for a in ARMS if a.name == arm).search_flags()['resource_eta']


def _final_tau(arm: str, s: dict) -> str | None:
  """The final τ, formatted; None for DARTS, which mixes by softmax(α) and samples nothing."""
  method = next(a for a in ARMS if a.name == arm).flags['method']
  return f'{s["tau"][0]:.3f}' if method == 'snas' else None


# Table 1 of the paper: search validation accuracy -> child accuracy without
# finetuning (%).
PAPER = {'snas_none': (88.54, 90.67), 'darts': (87.67, 54.66)}
# What the report calls keeping / losing accuracy: the mean child-minus-search
# gap over seeds, in percentage points.
KEEP_PP = -2.0
DROP_PP = -10.0


def none_edges(genotype: dict) -> int:
  """Edges of the derived child (normal + reduce, 28 in all) that are `none`."""
  from snas_jax import spaces
  space = spaces.get('darts')
  kept = sum(1 for cell in space.cell_types for node in genotype[cell]
             for op, _ in node if op != space.zero_op)
  return len(space.cell_types) * space.num_edges - kept


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


# ----------------------------------------------------------------------------
# Figures.


def plot_curves(results: Results, path: str) -> str:
  """Search validation, child validation, their gap, α entropy (normal solid,
  reduce dashed): per epoch, mean and min-max over seeds."""
  line = lambda value: (lambda ax: ax.axhline(value, color='0.3', linewidth=0.8))
  return study_lib.plot_curves(results, [
      ('search validation accuracy (%)', [(lambda r: 100 * r['search_val_acc'], '-', True)], None),
      ('derived child, no finetuning: validation accuracy (%)',
       [(lambda r: 100 * r['child_acc'], '-', True)], None),
      ('child − search (percentage points)',
       [(lambda r: 100 * (r['child_acc'] - r['search_val_acc']), '-', True)], line(0)),
      ('α entropy (normal solid, reduce dashed; max ln 8)',
       [(lambda r: r['alpha_entropy_normal'], '-', True),
        (lambda r: r['alpha_entropy_reduce'], '--', False)],
       lambda ax: ax.axhline(math.log(8), color='0.5', linewidth=0.8, linestyle=':')),
  ], path)


def plot_constraint(results: Results, summary: dict, path: str) -> str:
  """η against the child's cell parameters, FLOPs and `none` edges (SNAS runs;
  each seed a dot, mean ± sd a bar)."""
  from matplotlib.figure import Figure
  from snas_jax import reporting
  runs = results.runs
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
      ax.scatter([x] * len(vals), vals, color=results.study.arm(m).color, alpha=0.6, s=18)
      mean, sd = summary[m][key]
      ax.errorbar([x + 0.12], [mean], yerr=[sd], fmt='o', color='black', capsize=4)
    ax.set_xticks(xs, labels=[f'η={etas[m]:g}' for m in order])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return reporting.save_figure(fig, path)


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


def _verdicts(summary: dict) -> list[str]:
  """Agreement with the paper, each sentence computed from the numbers."""
  lines = []
  def gap_line(arm, claim):
    s = summary[arm]
    mean, sd = s['gap']
    n = len(s['seeds'])
    seeds = ', '.join(f'{100 * g:+.2f}' for g in s['per_seed']['gap'])
    paper_search, paper_child = PAPER[arm]
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
        f'- {LABELS[arm]}: child − search = {100 * mean:+.2f} ± {100 * sd:.2f} points '
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
    paper_diff = PAPER['snas_none'][1] - PAPER['snas_none'][0] - (PAPER['darts'][1] - PAPER['darts'][0])
    lines.append(
        f'- SNAS gap minus DARTS gap: {100 * diff:+.2f} points (paper {paper_diff:+.2f}; '
        f'standard error of the difference {100 * se:.2f}). '
        + ('The ordering agrees with the paper and exceeds twice its standard error.' if clear else
           'The ordering agrees with the paper, within twice its standard error.' if diff > 0 else
           'The ordering **disagrees** with the paper.'))
  for arm, s in summary.items():
    tau = _final_tau(arm, s)
    lines.append(
        f'- Premises, {LABELS[arm]}: {f"final τ {tau}; " if tau else ""}α entropy '
        f'{math.log(8):.3f} (uniform) at the start, {s["alpha_entropy_normal"][0]:.3f} (normal) and '
        f'{s["alpha_entropy_reduce"][0]:.3f} (reduce) at the end: '
        + ('α moved.' if min(s['alpha_entropy_normal'][0], s['alpha_entropy_reduce'][0])
           < math.log(8) - 0.1 else '**α barely moved**, so the child is close to arbitrary.'))
  snas = sorted((m for m in summary if m.startswith('snas_')), key=lambda m: float(eta(m)))
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


def report(results: Results) -> dict:
  """docs/replication.md: Table 1 at CPU scale, the paper's claims, figures,
  the reduced setting, provenance."""
  from snas_jax.spaces.darts import drawing, genotypes
  runs, doc, prefix = results.runs, results.doc, STUDY.output
  summary = study_lib.summarize(runs, final_numbers)
  figures = {'curves': plot_curves(results, doc(f'{prefix}_curves.png'))}
  if sum(1 for m in runs if runs[m][0]['config']['method'] == 'snas') > 1:
    figures['constraint'] = plot_constraint(results, summary, doc(f'{prefix}_constraint.png'))
  for arm, arm_runs in runs.items():
    g = arm_runs[0]['genotype']
    for cell in genotypes.CELL_TYPES:
      name = f'{prefix}_cell_{arm}_{cell}.png'
      drawing.draw_cell([[tuple(e) for e in node] for node in g[cell]], doc(name),
                        f'{LABELS[arm]}, seed {arm_runs[0]["seed"]}: {cell} cell')
      figures[f'cell_{arm}_{cell}'] = doc(name)
      dot = doc(name[:-4] + '.dot')
      if os.path.exists(dot):
        os.remove(dot)

  first = results.first()
  from snas_jax.search import SearchConfig  # its defaults are the paper's setting
  paper = dataclasses.asdict(SearchConfig())  # τ resolved to SNAS's schedule
  out = ['# Replication: does the derived child keep the search accuracy?', '',
         f'Generated by `{results.command()}` from the run folders; every number below comes '
         'from them.', '']
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
  for arm, s in summary.items():
    out.append(f'| {LABELS[arm]} (η = {eta(arm)}) | '
               f'{",".join(map(str, s["seeds"]))} | {pct(s["search_val_acc"])} | '
               f'{pct(s["child_val_acc"])} | {pct(s["child_test_acc"])} | {pp(s["gap"])} | '
               f'{num(s["child_params"])} | {num(s["child_flops"])} | {num(s["none_edges"], 1)} |')
  out += ['', 'Final α entropy (mean over edges; ln 8 = 2.079 is uniform) and τ:', '',
          '| method | α entropy normal | α entropy reduce | final τ |', '|---|---|---|---|']
  for arm, s in summary.items():
    out.append(f'| {LABELS[arm]} | {num(s["alpha_entropy_normal"], 3)} | '
               f'{num(s["alpha_entropy_reduce"], 3)} | {_final_tau(arm, s) or "— (no sampling)"} |')

  out += ['', '## 2. Against the paper', '',
          f'Criteria: the child *keeps* the search accuracy when the mean gap is at least '
          f'{KEEP_PP:g} points, and *drops* when it is below {DROP_PP:g} points (the paper: '
          f'{PAPER["snas_none"][1] - PAPER["snas_none"][0]:+.2f} for SNAS, '
          f'{PAPER["darts"][1] - PAPER["darts"][0]:+.2f} for DARTS). Absolute accuracies are '
          'far below the paper\'s: the network, images and budget are reduced (section 4), '
          'so only the gaps and the directions compare.', '']
  verdicts = _verdicts(summary)
  out += verdicts

  out += ['', '## 3. Figures', '',
          'Per-epoch curves: mean over seeds (line), min to max over seeds (band).', '',
          f'![curves]({prefix}_curves.png)', '']
  if 'constraint' in figures:
    out += ['Constraint effect (SNAS runs): each seed a dot, mean ± sd in black.', '',
            f'![constraint]({prefix}_constraint.png)', '']
  out += ['Derived cells, the first seed of each method (`none` edges not drawn):', '']
  for arm, arm_runs in runs.items():
    out += [f'{LABELS[arm]}, seed {arm_runs[0]["seed"]}:', '',
            f'![{arm} normal]({prefix}_cell_{arm}_normal.png)',
            f'![{arm} reduce]({prefix}_cell_{arm}_reduce.png)', '']

  out += ['## 4. The reduced setting', '',
          f'Shared by every run (read from the first run\'s checkpoint; settings flagfile '
          f'`{study_lib.settings_shown(results)}`). '
          'The paper\'s values are `SearchConfig`\'s defaults (docs/algorithm.md §5).', '',
          '| flag | here | paper | why |', '|---|---|---|---|']
  out += study_lib.setting_lines(results, paper, REASONS, PER_RUN_FIELDS)

  out += ['', '## 5. Provenance', '']
  out += study_lib.provenance(results)[0]
  return {'markdown': out, 'summary': summary, 'figures': figures, 'verdicts': verdicts}


STUDY = Study(name='table1', output='replication', settings='replication', arms=ARMS,
              seeds=(0, 1, 2), report=report)
