"""Searches a CIFAR-10 cell with SNAS (or the single-level DARTS baseline).

  python experiments/search_cifar.py --flagfile=experiments/configs/quick.flags

Writes checkpoints, metrics, genotype.json, α and plots into --workdir;
rerunning the same command resumes from the last checkpoint.

Installed (pip install .), the same program is ``snas-search``, and
``--config=NAME`` reads experiments/configs/NAME.flags from the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from snas_jax import scripts  # noqa: E402

if __name__ == '__main__':
  scripts.search_cifar()
