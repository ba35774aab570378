"""snas_jax: SNAS (Stochastic Neural Architecture Search) in JAX/Flax."""
__version__ = '0.1.0'

import os


def default_xla_flag(flag: str, value) -> None:
  """Adds ``flag=value`` to XLA_FLAGS unless the user set that flag. XLA reads
  XLA_FLAGS when JAX starts a backend, so call this before any computation."""
  current = os.environ.get('XLA_FLAGS', '')
  if flag not in current:
    os.environ['XLA_FLAGS'] = f'{current} {flag}={value}'.strip()


# XLA:CPU's default scheduler runs independent ops side by side and so keeps
# more buffers alive; the memory-minimising one keeps fewer (one 32x32, C=16
# search cell: 1.59 -> 1.48 GB of temporaries; at an earlier stage of the code
# 6.7 -> 1.2 GB, README "Performance"). Set on import, before JAX starts its
# CPU backend; a flag already in XLA_FLAGS wins.
default_xla_flag('--xla_cpu_scheduler_type', 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED')
