"""Search methods as values: adding one is its file here and one line below."""
from snas_jax.methods import darts, gdas, snas
from snas_jax.methods.base import Method

METHODS: dict[str, Method] = {m.name: m for m in (snas.METHOD, darts.METHOD, gdas.METHOD)}
NAMES = tuple(METHODS)


def get(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f'--method={name!r} is not a method; use one of {", ".join(NAMES)}')
  return METHODS[name]
