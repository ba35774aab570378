"""Searches a CIFAR-10 cell with SNAS (or the DARTS baseline).

  python experiments/search_cifar.py --flagfile=experiments/configs/quick.flags

Writes checkpoints, metrics, genotype.json, α and plots into --workdir;
rerunning the same command resumes from the last checkpoint.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from snas_jax import config, parallel, search  # noqa: E402

config.define_flags(search.SearchConfig)
flags.DEFINE_string('workdir', '', 'Folder for checkpoints and outputs (resumes if it holds one).')
flags.DEFINE_string('coordinator_address', '', 'host:port of process 0, for multi-host runs.')
flags.DEFINE_integer('num_processes', 1, 'Processes (hosts) in a multi-host run; -1 = detect (TPU, SLURM).')
flags.DEFINE_integer('process_id', 0, 'This process\'s index in a multi-host run.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  config.run_cli(lambda: search.run(config.from_flags(search.SearchConfig), FLAGS.workdir))


if __name__ == '__main__':
  app.run(main)
