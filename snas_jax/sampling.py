"""Concrete (Gumbel-softmax) sampling of the edge weights Z (docs/algorithm.md §2).

Z = softmax((α + G) / τ) per edge (row), G = -log(-log U), U ~ U(0, 1).
The same noise G also gives the discrete Gumbel-max sample
one_hot(argmax(α + G)) ~ Categorical(softmax(α)) that the score-function
resource gradient uses (costs.py). Keys are explicit ``jax.random`` keys.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def gumbel_noise(key: jax.Array, shape) -> jax.Array:
  """G = -log(-log U): standard Gumbel noise."""
  return jax.random.gumbel(key, shape, jnp.float32)


def relaxed_sample(alpha: jax.Array, noise: jax.Array, tau) -> jax.Array:
  """Soft sample Z = softmax((α + G) / τ) over the last axis. α, G: [E, K]."""
  return jax.nn.softmax((alpha + noise) / tau, axis=-1)


def hard_sample(alpha: jax.Array, noise: jax.Array) -> jax.Array:
  """Gumbel-max one-hot sample with the same noise: one_hot(argmax(α + G))."""
  return jax.nn.one_hot(jnp.argmax(alpha + noise, axis=-1), alpha.shape[-1], dtype=alpha.dtype)


def sample_arch_weights(key: jax.Array, alpha: jax.Array, tau):
  """(soft Z, hard Z, noise) for one cell type; α: [edges, ops]. No straight-through."""
  noise = gumbel_noise(key, alpha.shape)
  return relaxed_sample(alpha, noise, tau), hard_sample(alpha, noise), noise


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
  """The value of ``hard`` with the gradient of ``soft`` (GDAS's sample).
  soft - soft is exactly 0, so the forward value is exactly one-hot."""
  return hard + (soft - jax.lax.stop_gradient(soft))


def concrete_log_density(z: jax.Array, alpha: jax.Array, tau) -> jax.Array:
  """log p_α,τ(Z) of a Concrete sample, per row (Maddison et al. 2017):

  log((n-1)!) + (n-1) log τ + Σ_k α_k - (τ+1) Σ_k log Z_k - n log Σ_k exp(α_k) Z_k^-τ.
  z, alpha: [..., n] -> [...]. (A density on the simplex; Z must be interior.)
  """
  n = alpha.shape[-1]
  log_z = jnp.log(z)
  return (math.lgamma(n) + (n - 1) * jnp.log(tau) + alpha.sum(-1)
          - (tau + 1) * log_z.sum(-1)
          - n * jax.nn.logsumexp(alpha - tau * log_z, axis=-1))


def categorical_log_prob(one_hot: jax.Array, alpha: jax.Array) -> jax.Array:
  """log softmax(α)[k*] of a one-hot sample, per row: [..., n] -> [...]."""
  return (one_hot * jax.nn.log_softmax(alpha, axis=-1)).sum(-1)


def temperature(epoch, num_epochs: int, tau0: float = 1.0, tau_min: float = 0.03):
  """Linear per-epoch annealing τ0 -> τ_min, reaching τ_min at the last epoch.

  The reference hard-codes a 150-epoch ramp; ours follows the configured run.
  Returns a float32 array so that a new epoch does not retrace a jitted step.
  """
  frac = jnp.asarray(epoch, jnp.float32) / max(num_epochs - 1, 1)
  return jnp.asarray(tau0 - (tau0 - tau_min) * jnp.minimum(frac, 1.0), jnp.float32)


def entropy(alpha: jax.Array) -> jax.Array:
  """Entropy (nats) of softmax(α) per row: [..., n] -> [...]."""
  logp = jax.nn.log_softmax(alpha, axis=-1)
  return -(jnp.exp(logp) * logp).sum(-1)
