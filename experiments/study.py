"""Runs a study, a grid of (arm, seed) searches, and writes its report from
the run folders (snas_jax/study.py; the studies in snas_jax/studies/).

  # SNAS's Table 1 claim at CPU scale: docs/replication.md
  python experiments/study.py --study=table1 --workdir=workdirs/replication
  # SNAS, DARTS and GDAS on NAS-Bench-201: docs/nb201.md
  python experiments/study.py --study=nb201 --workdir=workdirs/nb201

Rerunning the command skips finished runs and resumes unfinished ones;
``--report`` only rebuilds the report from the run folders. Search flags after
``--`` override the study's settings flagfile in every run.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

from snas_jax import studies  # noqa: E402

if __name__ == '__main__':
  studies.define_flags()
  app.run(studies.main)
