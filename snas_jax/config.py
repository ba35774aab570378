"""Configuration in one place: dataclasses whose fields become absl flags.

Each experiment's config is a frozen dataclass; every field carries its help
string in ``field(metadata={'help': ...})``. ``define_flags`` turns the fields
into absl flags (so ``--flagfile`` works) and ``from_flags`` reads them back,
so a field is declared once and a flag can never lack a help string.
"""
from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np
from absl import flags

# Float flags enter float32 computations: beyond this range they become inf
# or 0 there.
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def field(default, help: str, choices: tuple | None = None):  # noqa: A002 (absl's name)
  return dataclasses.field(default=default, metadata={'help': help, 'choices': choices})


def define_flags(cls, flag_values=flags.FLAGS) -> None:
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    kind, help_text, choices = hints[f.name], f.metadata['help'], f.metadata.get('choices')
    if choices:
      flags.DEFINE_enum(f.name, f.default, list(choices), help_text, flag_values=flag_values)
    elif kind is bool:
      flags.DEFINE_bool(f.name, f.default, help_text, flag_values=flag_values)
    elif kind is int:
      flags.DEFINE_integer(f.name, f.default, help_text, flag_values=flag_values)
    elif kind is float:
      flags.DEFINE_float(f.name, f.default, help_text, flag_values=flag_values)
    else:
      flags.DEFINE_string(f.name, f.default, help_text, flag_values=flag_values)


def from_flags(cls, flag_values=flags.FLAGS):
  config = cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(cls)})
  validate(config)
  return config


def validate(config) -> None:
  """Checks every field's choices, that every float is finite and within
  float32's range, and the class's own ``check`` (one-line errors)."""
  hints = typing.get_type_hints(type(config))
  for f in dataclasses.fields(config):
    choices = f.metadata.get('choices')
    value = getattr(config, f.name)
    if choices and value not in choices:
      raise ValueError(f'--{f.name}={value!r} is not one of {", ".join(map(str, choices))}')
    if hints.get(f.name) is float:
      check_float32(f.name, value)
  if hasattr(config, 'check'):
    config.check()


def check_float32(name: str, value: float) -> None:
  """One-line ValueError unless ``value`` is finite and representable in float32."""
  value = float(value)
  if not math.isfinite(value) or abs(value) > FLOAT32_MAX or 0 < abs(value) < FLOAT32_TINY:
    raise ValueError(f'--{name}={value} is not a finite float32 number: use a value with '
                     f'{FLOAT32_TINY:.3g} <= |x| <= {FLOAT32_MAX:.3g} (or 0)')


def to_dict(config) -> dict:
  return dataclasses.asdict(config)


def positive(config, *names: str) -> None:
  for name in names:
    if getattr(config, name) <= 0:
      raise ValueError(f'--{name} must be positive, got {getattr(config, name)}')



BACKEND_HELP = ('Who runs the network: reference (the plain Flax model; GPU/TPU), cpu (XLA:CPU '
                'fast path: C++ kernels, fused VJPs, memory tuning) or auto (cpu on a CPU-only '
                'host, reference elsewhere). Checkpoints are the same under both.')
