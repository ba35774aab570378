"""The reference backend: the Flax modules as written (GPUs, TPUs, and the
specification every other backend must equal)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def init_key(key: jax.Array) -> jax.Array:
  """``key`` as an 'unsafe_rbg' key: its draws are one RngBitGenerator op
  each, not threefry's expansion, so the jitted init of the paper's search
  network compiles ~8x faster (18 s instead of 175 s on 2 CPU cores; 112 s
  of init on an H200 with threefry). Split quality matters little for
  drawing initial weights."""
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return jax.random.wrap_key_data(jnp.tile(jnp.ravel(data).astype(jnp.uint32), 2)[:4],
                                  impl='unsafe_rbg')


class ReferenceBackend:
  name = 'reference'

  def bind(self, network):
    return network

  def init_variables(self, network, rngs, *args, **kwargs) -> dict:
    rngs = ({k: init_key(v) for k, v in rngs.items()} if isinstance(rngs, dict)
            else init_key(rngs))
    return jax.jit(lambda rngs: network.init(rngs, *args, **kwargs))(rngs)
