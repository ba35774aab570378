"""The studies (snas_jax/study.py runs them) and their command line
(experiments/study.py): adding a study is its file here and one line below."""
from snas_jax import study
from snas_jax.studies import nb201, table1

STUDIES = {s.name: s for s in (table1.STUDY, nb201.STUDY)}


# ----------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_enum('study', None, list(STUDIES), 'Which study: '
                    + '; '.join(f'{n}: {s.output}.md' for n, s in STUDIES.items()) + '.')
  flags.DEFINE_string('workdir', '', 'Folder of the study: runs/<arm>/seed<k> and the state file '
                      '<report name>.json.')
  flags.DEFINE_list('arms', [], 'Which arms to run (default: all of the study\'s).')
  flags.DEFINE_list('seeds', [], 'Seeds of every arm (default: the study\'s).')
  flags.DEFINE_string('settings', '', 'Flagfile of the search setting every run shares (default: '
                      'the study\'s shipped one); search flags after "--" on the command line '
                      'override it.')
  flags.DEFINE_string('backend', 'auto', 'The searches\' --backend (auto: the CPU backend on a '
                      'CPU-only host).')
  flags.DEFINE_bool('report', False, 'Only rebuild the report from the finished runs.')
  flags.DEFINE_string('docs_dir', str(study.DOCS_DIR), 'Where the report and its PNGs go.')


def main(argv: list[str]) -> None:
  from absl import flags, logging
  logging.set_verbosity(logging.ERROR)  # Orbax warns about every read-only checkpoint it opens
  FLAGS = flags.FLAGS
  if not FLAGS.study:
    raise SystemExit(f'error: --study is required: one of {", ".join(STUDIES)}')
  if not FLAGS.workdir:
    raise SystemExit('error: --workdir is required')
  study_ = STUDIES[FLAGS.study]
  extra = list(argv[1:])
  try:
    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else list(study_.seeds)
  except ValueError:
    raise SystemExit(f'error: --seeds={",".join(FLAGS.seeds)}: give whole numbers, e.g. '
                     '--seeds=0,1,2') from None
  try:
    if not FLAGS.report:
      study.run_grid(study_, FLAGS.workdir, FLAGS.arms or [a.name for a in study_.arms], seeds,
                     FLAGS.settings or None, FLAGS.backend, extra)
    result = study.write_report(study_, FLAGS.workdir, FLAGS.docs_dir)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'report: {result["markdown"]}')
  for line in result['verdicts']:
    print(line)
