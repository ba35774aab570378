"""Retrains a derived cell on ImageNet, mobile setting (docs/algorithm.md §7); reports top-1 / top-5 error.

  python experiments/train_imagenet.py --flagfile=experiments/configs/train_imagenet_paper.flags \
      --arch=SNAS_moderate --workdir=/tmp/snas_moderate_imagenet
  python experiments/train_imagenet.py --search_workdir=/tmp/search \
      --workdir=/tmp/retrain_imagenet --tfds_data_dir=~/tensorflow_datasets
  python experiments/train_imagenet.py --arch=DARTS_V2 --summary

The architecture comes from exactly one of --search_workdir, --genotype_json,
--arch. Writes checkpoints, metrics.jsonl, tensorboard/ and final.json into
--workdir; rerunning the same command resumes from the last checkpoint.

Installed (pip install .), the same program is ``snas-train-imagenet``, and
``--config=NAME`` reads experiments/configs/NAME.flags from the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from snas_jax import scripts  # noqa: E402

if __name__ == '__main__':
  scripts.train_imagenet()
