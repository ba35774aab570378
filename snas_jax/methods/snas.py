"""SNAS (Xie et al., ICLR 2019): Z is a Gumbel-softmax (Concrete) sample at
temperature τ; its gradient reaches α through the sample (eq. 6)."""
from snas_jax import sampling
from snas_jax.methods.base import Method


def draw(key, alpha, tau):
  soft, hard, _ = sampling.sample_arch_weights(key, alpha, tau)
  return soft, hard


METHOD = Method(
    name='snas',
    help='Gumbel-softmax samples Z at temperature τ, SNAS derivation (argmax of every op per edge)',
    draw=draw,
    tau_schedule=(1.0, 0.03),  # the paper's τ0 and its final τ after 150 epochs
    derivation='snas',
    search_validation='the supernet with a fresh Gumbel-softmax sample per batch at the current τ',
    discrete=True)
