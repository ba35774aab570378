"""The search spaces, by name: ``get('darts')`` is the DARTS cell's ``SearchSpace``, ``get('nb201')``
NAS-Bench-201's.

Adding a space: its own module (or package, as darts/) in this folder that
builds a ``SearchSpace`` (base.py says what each field holds), and one line
in ``SPACES`` (docs/spaces.md).
"""
from __future__ import annotations

from snas_jax.spaces import darts, nb201
from snas_jax.spaces.base import Op, SearchSpace

SPACES = {
    'darts': darts.SPACE,
    'nb201': nb201.SPACE,
}
DEFAULT = 'darts'


def get(name: str) -> SearchSpace:
  """The space called ``name``; a one-line ValueError naming the known ones otherwise."""
  if name not in SPACES:
    raise ValueError(f'unknown search space {name!r}; choose one of {", ".join(SPACES)}')
  return SPACES[name]


def as_space(space) -> SearchSpace:
  """``space`` itself, or the space it names; None: the default space."""
  return space if isinstance(space, SearchSpace) else get(space or DEFAULT)


__all__ = ['DEFAULT', 'Op', 'SearchSpace', 'SPACES', 'as_space', 'get']
