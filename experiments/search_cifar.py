"""Searches a CIFAR-10 cell with SNAS (or the single-level DARTS baseline).

  python experiments/search_cifar.py --flagfile=experiments/configs/quick.flags

Writes checkpoints, metrics, genotype.json, α and plots into --workdir;
rerunning the same command resumes from the last checkpoint.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

from snas_jax import cli, config, search  # noqa: E402

config.define_flags(search.SearchConfig)
cli.define_runtime_flags()

if __name__ == '__main__':
  app.run(lambda argv: cli.main(search.run, search.SearchConfig))
