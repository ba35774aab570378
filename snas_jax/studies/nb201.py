"""SNAS, DARTS and GDAS on NAS-Bench-201 over seeds (docs/nb201.md).

Three arms, ``--space=nb201 --method=<m>``, 3 seeds, the shipped
``nb201_study.flags`` (a reduced NB201 search protocol; its header says why
each flag differs):

  python experiments/study.py --study=nb201 --workdir=workdirs/nb201

After the searches every derived cell is trained from scratch for one short
budget (``nb201_study_retrain.flags``), so that cells are ranked by trained
accuracy without the benchmark file. The report gives, per method, mean ± sd
over seeds of the search validation accuracy, the derived child's accuracy
without finetuning, the final α entropy, the derived arch strings and their
composition, the retrained cells' test accuracy, the NAS-Bench-201
accuracies of the derived cells when the runs' summaries hold them (searches
run with ``--benchmark_dir``), and the published NB201 figures beside them.
"""
from __future__ import annotations

import math
import re

import numpy as np

from snas_jax import benchmark, study as study_lib
from snas_jax.study import Arm, Results, Study, num, pct

METHODS = ('snas', 'darts', 'gdas')
ARMS = tuple(Arm(m, label, {'space': 'nb201', 'method': m}, color) for m, label, color in (
    ('snas', 'SNAS', 'tab:blue'),
    ('darts', 'DARTS (single-level)', 'tab:red'),
    ('gdas', 'GDAS', 'tab:orange')))
LABELS = {a.name: a.label for a in ARMS}

# The benchmark's accuracies of a derived cell (snas_jax/benchmark.py's record
# keys) and their column titles (data set, evaluation set); a column appears
# only when the runs hold it.
BENCHMARK = {key: f'{dataset} {eval_set}' for key, dataset, eval_set in benchmark.ACCURACIES}

# NB201's search protocol (AutoDL-Projects' DARTS.config, DARTS-V1.sh): the
# reference column of the setting table.
PROTOCOL = {'channels': 16, 'layers': 5, 'image_size': 32, 'heldout_images': 25000,
            'num_train_images': 0, 'num_eval_images': 0, 'num_test_images': 0,
            'batch_size': 64, 'epochs': 50, 'w_lr': 0.025, 'w_lr_min': 0.001,
            'w_momentum': 0.9, 'w_weight_decay': 5e-4, 'grad_clip': 5.0, 'alpha_lr': 3e-4,
            'alpha_beta1': 0.5, 'alpha_beta2': 0.999, 'alpha_weight_decay': 1e-3,
            'drop_path': 0.0, 'resource_eta': 0.0}
REASONS = {
    'channels': 'compute: C = 8',
    'layers': 'compute: N = 2 cells per stage, 6 search cells instead of 15',
    'image_size': 'compute: area-downsampled CIFAR-10 images, the same 10 classes',
    'num_train_images': 'compute: a class-balanced subset of the search half',
    'num_eval_images': 'compute: the per-epoch evaluations',
    'num_test_images': 'compute: the final test',
    'epochs': 'compute; the same budget for every method (GDAS: 240 in NB201)',
    'w_lr': 'w trains with far fewer steps than in NB201',
    'alpha_lr': 'at 3e-4, α stays at its initial entropy in a short search',
    'batch_size': 'compute',
}
# NB201's training protocol of every cell (AutoDL-Projects' CIFAR.config):
# the reference column of the retraining's setting table.
TRAIN_PROTOCOL = {'channels': 16, 'layers': 5, 'num_train_images': 0, 'num_eval_images': 0,
                  'batch_size': 256, 'epochs': 200, 'learning_rate': 0.1, 'lr_schedule': 'cosine',
                  'weight_decay': 5e-4, 'grad_clip': 0.0, 'cutout': 0}
TRAIN_REASONS = {
    'channels': 'compute: the search network\'s skeleton, C = 8',
    'layers': 'compute: N = 2 cells per stage',
    'num_train_images': 'compute: a class-balanced subset',
    'num_eval_images': 'compute',
    'batch_size': 'compute: more steps in a short budget',
    'epochs': 'compute: one short budget, the same for every cell',
}
TRAIN_PER_RUN_FIELDS = {'space', 'dataset', 'search_workdir', 'derive_rule', 'genotype_json',
                        'arch', 'seed', 'data_dir', 'tfds_data_dir', 'backend',
                        'checkpoint_every_steps', 'stop_after_step', 'progress', 'remat', 'init',
                        'auxiliary_weight', 'drop_path_prob', 'dtype', 'image_size',
                        'allow_large'}
# Published CIFAR-10 test accuracies on NAS-Bench-201 (cells trained 200
# epochs by NB201's protocol): SNAS as reported in the NB201 literature,
# single-level DARTS from NAS-Bench-201's Table 5 (it derives the all-skip
# cell), and the best cell of the space.
PUBLISHED = (('SNAS', '92.77 ± 0.83%'), ('DARTS (single-level)', '54.30% (the all-skip cell)'),
             ('best cell of the space', '94.37%'))

# Fields that are not part of the shared setting (τ: each method's own schedule).
PER_RUN_FIELDS = {'space', 'method', 'seed', 'data_dir', 'tfds_data_dir', 'backend',
                  'checkpoint_every_steps', 'stop_after_step', 'eval_batch_size', 'remat',
                  'benchmark_dir', 'tau0', 'tau_min'}


def arch_string(genotype) -> str:
  """The arch string of a derived NB201 cell (its JSON form ``{"arch": ...}`` or the string)."""
  return genotype['arch'] if isinstance(genotype, dict) else str(genotype)


def composition(arch: str) -> dict:
  """{op: how many of the cell's edges hold it}, for every op of the NB201 space."""
  from snas_jax.spaces import nb201
  ops = nb201.Arch.from_string(arch).ops
  return {op: sum(o == op for o in ops) for op in nb201.OP_NAMES}


def alpha_entropy(record: dict) -> float:
  """The record's α entropy (mean over edges), averaged over its cell types."""
  values = [v for k, v in record.items() if re.fullmatch(r'alpha_entropy_[a-z0-9]+', k)]
  return float(np.mean(values))


def benchmark_record(run: dict) -> dict:
  """The benchmark accuracies of the run's derived cell, wherever its summary
  holds them (top level, a ``benchmark`` entry, the last epoch's record); {} if nowhere."""
  summary = run['summary']
  for place in (summary, summary.get('benchmark') or {}, summary.get('last_epoch') or {},
                run['records'][-1]):
    found = {k: place[k] for k in BENCHMARK if place.get(k) is not None}
    if found:
      return found
  return {}


def final_numbers(run: dict) -> dict:
  """The comparison's numbers of one run (accuracies as fractions)."""
  last = run['records'][-1]
  arch = arch_string(run['genotype'])
  return {'search_val_acc': last['search_val_acc'], 'child_val_acc': last['child_acc'],
          'child_test_acc': run['summary']['child_test_acc'],
          'alpha_entropy': alpha_entropy(last), 'epochs': len(run['records']),
          **{f'edges_{op}': n for op, n in composition(arch).items()},
          **retrained(run), **benchmark_record(run)}


def retrained(run: dict) -> dict:
  """The retraining's test accuracy and size of the run's derived cell; {} if not retrained."""
  final = run.get('retrain')
  if not final:
    return {}
  return {'retrain_test_acc': 1 - final['test_error'] / 100, 'retrain_params_M': final['params_M']}


def plot_curves(results: Results, path: str) -> str:
  """Search validation, child validation and α entropy per epoch."""
  from snas_jax.spaces import nb201
  num_ops = len(nb201.OP_NAMES)
  return study_lib.plot_curves(results, [
      ('search validation accuracy (%)', [(lambda r: 100 * r['search_val_acc'], '-', True)], None),
      ('derived child, no finetuning: validation accuracy (%)',
       [(lambda r: 100 * r['child_acc'], '-', True)], None),
      (f'α entropy (mean over edges; max ln {num_ops})', [(alpha_entropy, '-', True)],
       lambda ax: ax.axhline(math.log(num_ops), color='0.5', linewidth=0.8, linestyle=':')),
  ], path)


def _collapse_lines(summary: dict, archs: dict) -> list[str]:
  """Per method: how many edges of the derived cells are skip connections and
  how many cells hold no convolution, from the numbers."""
  from snas_jax.spaces import nb201
  lines = []
  for arm, s in summary.items():
    skip = f'edges_{nb201.SKIP_OP}'
    skips = s['per_seed'][skip]
    no_conv = sum(1 for a in archs[arm]
                  if not set(nb201.CONV_OPS) & set(nb201.Arch.from_string(a).ops))
    lines.append(f'- {LABELS[arm]}: {num(s[skip], 1)} of {len(nb201.EDGES)} edges are '
                 f'skip connections (per seed: {", ".join(str(k) for k in skips)}); '
                 f'{no_conv} of {len(skips)} derived cells hold no convolution.')
  return lines


# A derived cell is skip-dominated when at least this many of its edges are
# skip connections (DARTS's collapse on NB201 ends in the all-skip cell, 6 of 6).
SKIP_DOMINATED = 4


def collapse_verdict(summary: dict, archs: dict) -> list[str]:
  """Whether DARTS collapses to skip connections here and SNAS does not, from
  the derived cells of every seed (a method collapses when most of its cells
  are skip-dominated)."""
  from snas_jax.spaces import nb201
  collapsed, lines = {}, []
  for arm in summary:
    skips = [sum(op == nb201.SKIP_OP for op in nb201.Arch.from_string(a).ops) for a in archs[arm]]
    dominated = sum(k >= SKIP_DOMINATED for k in skips)
    collapsed[arm] = 2 * dominated > len(skips)
    lines.append(f'- {LABELS[arm]}: {dominated} of {len(skips)} derived cells are skip-dominated '
                 f'(at least {SKIP_DOMINATED} of {len(nb201.EDGES)} edges skip; skip edges '
                 f'{num(summary[arm][f"edges_{nb201.SKIP_OP}"], 1)}; final α entropy '
                 f'{num(summary[arm]["alpha_entropy"], 2)} of {math.log(len(nb201.OP_NAMES)):.2f} '
                 'for a uniform α): '
                 + ('collapses to skip connections.' if collapsed[arm] else 'does not collapse.'))
  if 'darts' in collapsed and 'snas' in collapsed:
    agrees = collapsed['darts'] and not collapsed['snas']
    lines.append(('As in the published figures' if agrees else 'Unlike the published figures')
                 + f', DARTS {"collapses" if collapsed["darts"] else "does not collapse"} and SNAS '
                 f'{"collapses" if collapsed["snas"] else "does not"} here.')
  return lines


def report(results: Results) -> dict:
  """docs/nb201.md: the per-method table, the derived cells and their
  composition, the benchmark's accuracies when present, figures, the reduced
  setting, provenance."""
  from snas_jax import methods
  from snas_jax.spaces import nb201
  runs, doc, prefix = results.runs, results.doc, STUDY.output
  summary = study_lib.summarize(runs, final_numbers)
  op_names = nb201.OP_NAMES  # the composition table's columns
  search_validation = {arm: methods.get(STUDY.arm(arm).flags['method']).search_validation
                       for arm in runs}
  archs = {arm: [arch_string(r['genotype']) for r in arm_runs] for arm, arm_runs in runs.items()}
  figures = {'curves': plot_curves(results, doc(f'{prefix}_curves.png'))}
  for arm, arm_runs in runs.items():
    name = f'{prefix}_cell_{arm}.png'
    figures[f'cell_{arm}'] = nb201.draw_arch(
        nb201.Arch.from_string(archs[arm][0]), doc(name),
        f'{LABELS[arm]}, seed {arm_runs[0]["seed"]}: {archs[arm][0]}')

  first = results.first()
  out = ['# NAS-Bench-201: SNAS, DARTS and GDAS over seeds', '',
         f'Generated by `{results.command()}` from the run folders; every number below comes '
         'from them.', '',
         f'Each method searches the NAS-Bench-201 cell with {len(first["records"])} epochs and '
         'the seeds listed below, in the reduced setting of section 7: the search trains on '
         'one part of the training set and validates on held-out training images; the test '
         'set is read once per run, for the final child.', '']

  out += ['## 1. Per method', '',
          'Mean ± sample standard deviation over seeds. Search validation, at the last epoch: '
          + '; '.join(f'{LABELS[arm]}, {search_validation[arm]}' for arm in runs)
          + '. Child: the cell derived by the method\'s own rule (docs/spaces.md) as one-hot Z '
          f'with the supernet\'s weights, no finetuning. α entropy: mean over the '
          f'{len(nb201.EDGES)} edges (ln {len(op_names)} = {math.log(len(op_names)):.3f} is '
          'uniform).', '',
          '| method | seeds | search val acc (%) | child val acc (%) | child test acc (%) '
          '| α entropy |', '|---|---|---|---|---|---|']
  for arm, s in summary.items():
    out.append(f'| {LABELS[arm]} | {",".join(map(str, s["seeds"]))} | {pct(s["search_val_acc"])} '
               f'| {pct(s["child_val_acc"])} | {pct(s["child_test_acc"])} '
               f'| {num(s["alpha_entropy"], 3)} |')

  out += ['', '## 2. Derived cells', '',
          f'Composition: of the {len(nb201.EDGES)} edges of the derived cell, how many hold each '
          'op (mean ± sd over seeds).', '',
          '| method | ' + ' | '.join(f'`{op}`' for op in op_names) + ' |',
          '|---' * (len(op_names) + 1) + '|']
  for arm, s in summary.items():
    out.append(f'| {LABELS[arm]} | ' + ' | '.join(num(s[f'edges_{op}'], 1) for op in op_names)
               + ' |')
  verdicts = _collapse_lines(summary, archs)
  out += [''] + verdicts + ['', 'Arch strings, per seed:', '']
  for arm, arm_runs in runs.items():
    for run, arch in zip(arm_runs, archs[arm]):
      out.append(f'- {LABELS[arm]}, seed {run["seed"]}: `{arch}`')

  out += ['', '## 3. The derived cells trained from scratch', '']
  retrain_runs = [(arm, r) for arm, arm_runs in runs.items() for r in arm_runs if r.get('retrain')]
  if retrain_runs:
    out += ['Each derived cell in the child network, trained from scratch with the same short '
            f'budget (`{study_lib.retrain_settings_shown(results)}`, section 7) and tested on '
            f'{retrain_runs[0][1]["retrain"]["eval_images"]:,} CIFAR-10 test images: a ranking of '
            'the cells that needs no benchmark file. Its accuracies are far below NB201\'s '
            '200-epoch ones; only their order is comparable.', '',
            '| method | seeds | test acc (%) | params (M) |', '|---|---|---|---|']
    for arm, s in summary.items():
      if 'retrain_test_acc' in s:
        out.append(f'| {LABELS[arm]} | {",".join(map(str, s["seeds"]))} '
                   f'| {pct(s["retrain_test_acc"])} | {num(s["retrain_params_M"], 3)} |')
    out += ['', 'Every retrained cell, best first:', '',
            '| rank | method | seed | test acc (%) | arch string |', '|---|---|---|---|---|']
    ranked = sorted(retrain_runs, key=lambda ar: ar[1]['retrain']['test_error'])
    for rank, (arm, r) in enumerate(ranked, 1):
      out.append(f'| {rank} | {LABELS[arm]} | {r["seed"]} '
                 f'| {100 - r["retrain"]["test_error"]:.2f} | `{arch_string(r["genotype"])}` |')
  else:
    out += ['Not in these runs: the study command retrains every derived cell after the searches.']

  bench = [k for k in BENCHMARK if any(k in s for s in summary.values())]
  if bench:
    out += ['', '## 4. NAS-Bench-201 accuracies of the derived cells', '',
            'The benchmark\'s 200-epoch records of each derived cell (mean ± sd over seeds; '
            '— where a method\'s runs lack it).', '',
            '| method | ' + ' | '.join(f'{BENCHMARK[k]} (%)' for k in bench) + ' |',
            '|---' * (len(bench) + 1) + '|']
    for arm, s in summary.items():
      out.append(f'| {LABELS[arm]} | ' + ' | '.join(pct(s[k]) if k in s else '—' for k in bench)
                 + ' |')
  else:
    out += ['', '## 4. NAS-Bench-201 accuracies of the derived cells', '',
            'Not in these runs: search with `--benchmark_dir=<NATS-tss-v1_0-3ffb9-simple>` to '
            'have them.']


  out += ['', '## 5. Against the published NAS-Bench-201 figures', '',
          'CIFAR-10 test accuracy of the derived cells trained 200 epochs by NB201\'s protocol, '
          'as published: ' + '; '.join(f'{name} {acc}' for name, acc in PUBLISHED) + '. '
          'These runs are far shorter and smaller (section 7), so their accuracies are not '
          'comparable; what is comparable is the kind of cell each method derives:', '']
  verdict = collapse_verdict(summary, archs)
  out += [line if line.startswith('- ') else f'\n{line}' for line in verdict]
  verdicts = verdicts + verdict

  out += ['', '## 6. Figures', '',
          'Per-epoch curves: mean over seeds (line), min to max over seeds (band).', '',
          f'![curves]({prefix}_curves.png)', '',
          'Derived cells, the first seed of each method (`none` edges not drawn):', '']
  for arm in runs:
    out += [f'![{arm}]({prefix}_cell_{arm}.png)', '']

  out += ['## 7. The reduced setting', '',
          f'Shared by every run (read from the first run\'s checkpoint; settings flagfile '
          f'`{study_lib.settings_shown(results)}`), against NB201\'s search protocol '
          '(AutoDL-Projects\' DARTS configuration; τ follows each method\'s own schedule).', '',
          '| flag | here | NB201 | why |', '|---|---|---|---|']
  out += study_lib.setting_lines(results, PROTOCOL, REASONS, PER_RUN_FIELDS)
  if all(r.get('retrain_config') for arm_runs in runs.values() for r in arm_runs):
    out += ['', f'The retraining of section 3 (flagfile `{study_lib.retrain_settings_shown(results)}`'
            '), against NB201\'s training protocol (AutoDL-Projects\' CIFAR.config: Nesterov '
            'momentum, which this SGD does not use):', '',
            '| flag | here | NB201 | why |', '|---|---|---|---|']
    out += study_lib.setting_lines(results, TRAIN_PROTOCOL, TRAIN_REASONS, TRAIN_PER_RUN_FIELDS,
                                   config='retrain_config')

  out += ['', '## 8. Provenance', '']
  out += study_lib.provenance(results)[0]
  return {'markdown': out, 'summary': summary, 'figures': figures, 'verdicts': verdicts}


STUDY = Study(name='nb201', output='nb201', settings='nb201_study', arms=ARMS, seeds=(0, 1, 2),
              report=report, retrain='nb201_study_retrain')
