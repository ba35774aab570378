"""The CPU backend: XLA:CPU's fast path behind the backend contract.

Everything CPU-specific lives here and is imported only when this backend is
chosen: the edge-batched ops with hand-written VJPs and their XLA 'shift'
forms (``ops``), the C++ kernels built on first use (``native``), the forms
built from them that the reference cells run in place of the reference
modules (``forms``; they declare the reference's variables, so nothing is
converted), fast init, and the process settings XLA:CPU wants
(``process``). docs/cpu_backend.md says what each piece fuses and why. A
network that takes no forms (NB201's) runs as the reference modules
themselves, under the same process settings.

Float32 only: its kernels and fused VJPs are written for float32, so a
network with another compute dtype (``--dtype=bfloat16``) is refused here and
runs on the reference backend (``--backend=auto`` picks it).

Ops: 'native' (the C++ kernels) on one device; 'shift' (XLA's forms) on
several — XLA's SPMD partitioner cannot split a custom call — or where the
kernels do not build (no compiler; a warning says so).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from snas_jax.backends import reference
from snas_jax.backends.cpu import forms, native, ops


def default_impl() -> str:
  """'native' on a single device whose kernels build, else 'shift'."""
  if jax.device_count() == 1 and native.available():
    return 'native'
  if jax.device_count() == 1:
    native.warn_fallback()
  return 'shift'


class CpuBackend:
  name = 'cpu'

  def __init__(self, impl: str | None = None):
    self.impl = impl or default_impl()
    ops.resolve_impl(self.impl)  # 'native' without kernels: one line saying why

  def cpu_network(self, network, impl: str | None = None):
    """``network`` with this backend's forms plugged into its cells, or None
    for a network that takes no forms (then the reference modules themselves
    run: NB201's networks)."""
    if jnp.dtype(getattr(network, 'dtype', jnp.float32)) != jnp.float32:
      raise ValueError(f'the CPU backend computes in float32 only: use --backend=reference '
                       f'with --dtype={jnp.dtype(network.dtype).name}')
    if not hasattr(network, 'forms'):
      return None
    return network.clone(forms=forms.forms(impl or self.impl, network.remat))

  def bind(self, network):
    cpu = self.cpu_network(network)
    return network if cpu is None else cpu

  def init_variables(self, network, rngs, *args, **kwargs) -> dict:
    """All drawn parameters from one host-side stream (``ops.init_with_one_draw``:
    XLA:CPU compiles a per-parameter random draw slowly), traced with the
    compact 'lax' ops (the parameters do not depend on the ops' form). A
    network without this backend's forms: drawn as the reference draws it."""
    cpu = self.cpu_network(network, impl='lax')
    if cpu is None:
      return reference.ReferenceBackend().init_variables(network, rngs, *args, **kwargs)
    key = rngs['params'] if isinstance(rngs, dict) else rngs
    return ops.init_with_one_draw(lambda: cpu.init(rngs, *args, **kwargs), key)
