"""snas_jax: SNAS (Stochastic Neural Architecture Search) in JAX/Flax."""
