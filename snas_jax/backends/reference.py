"""The reference backend: the Flax modules as written (GPUs, TPUs, and the
specification every other backend must equal)."""
from __future__ import annotations

import jax


class ReferenceBackend:
  name = 'reference'

  def bind(self, network):
    return network

  def init_variables(self, network, rngs, *args, **kwargs) -> dict:
    return jax.jit(lambda: network.init(rngs, *args, **kwargs))()
