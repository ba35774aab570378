"""Backends: who runs the reference model's arithmetic.

One contract, the ``jax.nn.dot_product_attention(implementation=...)``
pattern: a backend takes a reference network (the DARTS space's
``search_model.SearchNetwork``, ``child_model.NetworkCIFAR`` / ``NetworkImageNet``
in ``spaces/darts/``) and returns a model with
the same ``init`` and ``apply`` signatures and the same meaning, whose
variables are the reference's (paths and shapes). Callers never see which
one ran, and a checkpoint written under one backend resumes under the other.

* ``reference``: the Flax modules themselves (what GPUs and TPUs run).
* ``cpu``: XLA:CPU's fast path (``backends/cpu``): fused custom VJPs, C++
  kernels, fast init and the process settings XLA:CPU wants; float32 only.
  Imported only when chosen.

The CPU backend swaps ops, not networks: it binds a reference network with
its own forms of the modules its cells run (``search_model.Forms``; its
fusions span a whole edge batch), which declare the reference's variables;
a network that takes no forms runs as it is.

A backend is chosen once at start-up (``resolve``), before JAX starts: the
CPU backend's process settings must be in place by then.
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import Protocol

NAMES = ('auto', 'reference', 'cpu')
DTYPES = ('float32', 'bfloat16')  # --dtype: what the convolutions and activations compute in
DTYPE_HELP = ('What convolutions and activations compute in: float32, or bfloat16 (mixed '
              'precision: parameters, α, BN statistics, the loss and the optimiser state stay '
              'float32; for GPUs and TPUs). The CPU backend is float32 only: bfloat16 runs on '
              'the reference backend (--backend=auto picks it).')

# Distributions that give JAX an accelerator (jax[cuda12], jax[tpu], ROCm).
_ACCELERATOR_PLUGINS = ('jax-cuda', 'jax_cuda', 'libtpu', 'jax-rocm', 'jax_rocm')


class Backend(Protocol):
  name: str

  def bind(self, network):
    """The network as this backend runs it: ``apply`` as Flax's, variables
    in the reference layout (``init_variables`` draws them)."""

  def init_variables(self, network, rngs, *args, **kwargs) -> dict:
    """``network.init(rngs, *args, **kwargs)`` (not for jit): the reference
    layout, values drawn as this backend draws them."""


def host_platform() -> str:
  """'cpu' where JAX can only run on the CPU, else 'accelerator'; decided
  without starting JAX (JAX_PLATFORMS if set, else the installed plugins)."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return 'cpu' if platforms.split(',')[0].strip() == 'cpu' else 'accelerator'
  names = {(d.metadata['Name'] or '').lower() for d in importlib.metadata.distributions()}
  return 'accelerator' if any(n.startswith(_ACCELERATOR_PLUGINS) for n in names) else 'cpu'


def resolve(name: str, platform: str | None = None, dtype: str = 'float32') -> str:
  """'auto' -> 'cpu' on a CPU-only host computing in float32, 'reference'
  elsewhere; other names as given. ``platform``: 'cpu' or 'accelerator'
  (default: ``host_platform()``); ``dtype``: the network's compute dtype (--dtype)."""
  if name not in NAMES:
    raise ValueError(f'unknown --backend={name!r}; choose one of {", ".join(NAMES)}')
  if name == 'auto':
    cpu_only = (platform or host_platform()) == 'cpu'
    return 'cpu' if cpu_only and dtype == 'float32' else 'reference'
  return name


def get(name: str) -> Backend:
  """The backend called ``name`` ('reference' or 'cpu'; resolve 'auto' first)."""
  if name == 'reference':
    from snas_jax.backends import reference
    return reference.ReferenceBackend()
  if name == 'cpu':
    from snas_jax.backends import cpu
    return cpu.CpuBackend()
  raise ValueError(f'unknown backend {name!r}; resolve --backend first (one of reference, cpu)')
