"""What a search method is: one value that the search step, its evaluation and
its derivation read (docs/algorithm.md §2 and §6)."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Method:
  """A search method.

  draw(key, α, τ) -> (Z, hard): Z is what the network runs with on every edge
  of one cell type ([edges, ops], differentiable in α), hard the discrete
  one-hot sample behind it (None for a method without one); the resource
  penalty's score-function estimator needs ``hard``.
  """
  name: str
  help: str  # one phrase, for the --method flag's help
  draw: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array | None]]
  # Linear per-epoch temperature τ0 -> τ_min unless --tau0 / --tau_min say
  # otherwise; None: τ is not used.
  tau_schedule: tuple[float, float] | None
  # The derivation rule (a key of the space's derive_rules) its child is read with.
  derivation: str
  # What its per-epoch "search validation accuracy" measures.
  search_validation: str
  # Whether draw() yields a one-hot sample (the score-function estimator needs one).
  discrete: bool
