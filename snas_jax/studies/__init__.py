"""Study definitions (snas_jax/study.py runs them): adding one is its file here
and one line below."""
from snas_jax.studies import nb201, table1

STUDIES = {s.name: s for s in (table1.STUDY, nb201.STUDY)}
