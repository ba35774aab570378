"""Retrains a derived cell from scratch on CIFAR-10 (SPEC §7) and reports its test error.

  python experiments/train_cifar.py --flagfile=experiments/configs/train_cifar_paper.flags \
      --arch=SNAS_moderate --workdir=/tmp/snas_moderate
  python experiments/train_cifar.py --search_workdir=/tmp/search --workdir=/tmp/retrain
  python experiments/train_cifar.py --arch=DARTS_V2 --summary

The architecture comes from exactly one of --search_workdir, --genotype_json,
--arch. Writes checkpoints, metrics.jsonl, tensorboard/ and final.json into
--workdir; rerunning the same command resumes from the last checkpoint.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from snas_jax import config, parallel, train  # noqa: E402

config.define_flags(train.TrainConfig)
flags.DEFINE_string('workdir', '', 'Folder for checkpoints and outputs (resumes if it holds one). '
                    'Required unless --summary.')
flags.DEFINE_bool('summary', False, 'Print the parameters (M, auxiliary head excluded) and '
                  'multiply-adds (M) per image of the network, then exit.')
flags.DEFINE_string('coordinator_address', '', 'host:port of process 0, for multi-host runs.')
flags.DEFINE_integer('num_processes', 1, 'Processes (hosts) in a multi-host run; -1 = detect (TPU, SLURM).')
flags.DEFINE_integer('process_id', 0, 'This process\'s index in a multi-host run.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  config.run_cli(lambda: train.main(config.from_flags(train.TrainConfig), FLAGS.workdir,
                                    FLAGS.summary))


if __name__ == '__main__':
  app.run(main)
