"""GDAS (Dong & Yang, CVPR 2019): a straight-through Gumbel sample. The
forward pass runs the one-hot argmax of (α + G)/τ, the backward pass takes the
gradient of the soft sample softmax((α + G)/τ) (docs/algorithm.md §2).

GDAS's own code runs only the sampled op of each edge; here every op runs and
the one-hot Z multiplies them (docs/algorithm.md says why)."""
from snas_jax import sampling
from snas_jax.methods.base import Method


def draw(key, alpha, tau):
  soft, hard, _ = sampling.sample_arch_weights(key, alpha, tau)
  return sampling.straight_through(hard, soft), hard


METHOD = Method(
    name='gdas',
    help='straight-through Gumbel samples (one-hot forward, soft gradient), τ 10 -> 0.1 as GDAS, '
         'DARTS top-2 derivation',
    draw=draw,
    tau_schedule=(10.0, 0.1),  # GDAS's tau_max and tau_min (AutoDL-Projects' GDAS search)
    derivation='darts',
    search_validation='the supernet with a fresh one-hot straight-through sample per batch',
    discrete=True)
