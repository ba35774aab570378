"""Single-level DARTS (Liu et al., ICLR 2019, first order, w and α on the same
batch): Z = softmax(α), deterministic; the child keeps the top-2 edges per node."""
import jax

from snas_jax.methods.base import Method


def draw(key, alpha, tau):
  del key, tau  # deterministic, no temperature
  return jax.nn.softmax(alpha, axis=-1), None


METHOD = Method(
    name='darts',
    help='Z = softmax(α) (single-level DARTS baseline), DARTS top-2 derivation',
    draw=draw,
    tau_schedule=None,
    derivation='darts',
    search_validation='the supernet with Z = softmax(α)',
    discrete=False)
