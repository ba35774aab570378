"""snas_jax: SNAS (Stochastic Neural Architecture Search) in JAX/Flax."""

__version__ = '0.1.0'
