"""snas_jax: SNAS (Stochastic Neural Architecture Search) in JAX/Flax."""
import os


def default_xla_flag(flag: str, value) -> None:
  """Adds ``flag=value`` to XLA_FLAGS unless the user set that flag. XLA reads
  XLA_FLAGS when JAX starts a backend, so call this before any computation."""
  current = os.environ.get('XLA_FLAGS', '')
  if flag not in current:
    os.environ['XLA_FLAGS'] = f'{current} {flag}={value}'.strip()


# XLA:CPU's concurrency-optimised scheduler (its default) runs independent ops
# side by side and so keeps many more buffers alive: on a 32x32, C=16 search
# cell it asked for 6.7 GB of temporaries and ran 7.3 s per step; the
# memory-minimising scheduler took 1.2 GB and 4.7 s (experiments/bench_search.py,
# README "Performance"). Set on import, before JAX starts its CPU backend.
default_xla_flag('--xla_cpu_enable_concurrency_optimized_scheduler', 'false')
