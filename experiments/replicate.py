"""Replicates SNAS's Table 1 claim at CPU scale: SNAS without constraint, at the
moderate and aggressive constraint levels, and the single-level DARTS
baseline, 3 seeds each, then writes docs/replication.md and its figures.

  python experiments/replicate.py --workdir=workdirs/replication

Rerunning the command skips finished runs and resumes unfinished ones;
``--report`` only rebuilds the report from the run folders. Search flags after
``--`` override the settings flagfile (experiments/configs/replication.flags)
in every run.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

from snas_jax import replication  # noqa: E402

if __name__ == '__main__':
  replication.define_flags()
  app.run(replication.main)
