"""Retrains a derived cell on ImageNet, mobile setting (SPEC §7); reports top-1 / top-5 error.

  python experiments/train_imagenet.py --flagfile=experiments/configs/train_imagenet_paper.flags \
      --arch=SNAS_moderate --workdir=/tmp/snas_moderate_imagenet
  python experiments/train_imagenet.py --search_workdir=/tmp/search \
      --workdir=/tmp/retrain_imagenet --tfds_data_dir=~/tensorflow_datasets
  python experiments/train_imagenet.py --arch=DARTS_V2 --summary

The architecture comes from exactly one of --search_workdir, --genotype_json,
--arch. Writes checkpoints, metrics.jsonl, tensorboard/ and final.json into
--workdir; rerunning the same command resumes from the last checkpoint.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from snas_jax import cli, config, train  # noqa: E402

config.define_flags(train.TrainConfig)
# The ImageNet defaults (SPEC §7, App. G.3): train.IMAGENET_DEFAULTS.
for _name, _value in train.IMAGENET_DEFAULTS.items():
  flags.FLAGS.set_default(_name, _value)
cli.define_runtime_flags(summary=True)

if __name__ == '__main__':
  app.run(lambda argv: cli.main(train.train_and_evaluate, train.TrainConfig,
                                  train.print_summary))
