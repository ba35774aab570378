"""Retrains a derived cell from scratch on CIFAR-10 (docs/algorithm.md §7) and reports its test error.

  python experiments/train_cifar.py --flagfile=experiments/configs/train_cifar_paper.flags \
      --arch=SNAS_moderate --workdir=/tmp/snas_moderate
  python experiments/train_cifar.py --search_workdir=/tmp/search --workdir=/tmp/retrain
  python experiments/train_cifar.py --arch=DARTS_V2 --summary

The architecture comes from exactly one of --search_workdir, --genotype_json,
--arch. Writes checkpoints, metrics.jsonl, tensorboard/ and final.json into
--workdir; rerunning the same command resumes from the last checkpoint.

Installed (pip install .), the same program is ``snas-train-cifar``, and
``--config=NAME`` reads experiments/configs/NAME.flags from the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from snas_jax import scripts  # noqa: E402

if __name__ == '__main__':
  scripts.train_cifar()
