"""Nothing outside a space's own files names an op (issue 26, docs/spaces.md):
a source scan of snas_jax/ for the ops of every registered space."""
import ast
import dataclasses
import os

import pytest

from conftest import ROOT
from snas_jax import spaces

PACKAGE = os.path.join(ROOT, 'snas_jax')
# The spaces' own files, and the CPU backend's forms of the DARTS ops.
OWN_FOLDERS = ('spaces', 'backends')
# Op families, beside every space's op names: a prefix test names them too.
FAMILIES = ('sep_conv', 'dil_conv', 'nor_conv', 'max_pool', 'avg_pool', 'skip_connect')


def _op_words() -> tuple:
  names = {op for space in spaces.SPACES.values() for op in space.op_names}
  return tuple(sorted(names | set(FAMILIES)))


def _hits(source: str) -> list:
  """(line, string) of every string literal in ``source`` that names an op.

  Docstrings and other bare string statements are prose, not code, and are
  left out. An op name with an underscore counts anywhere in a string (an
  f-string's pieces, a regular expression, an arch string); one without
  (``none``, also an English word) only as the whole string.
  """
  tree = ast.parse(source)
  prose = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
  words = _op_words()
  hits = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in prose):
      text = node.value
      if any((w in text) if '_' in w else (w == text) for w in words):
        hits.append((node.lineno, text))
  return hits


def test_the_scan_finds_op_names():
  assert {'none', 'sep_conv_5x5', 'nor_conv_1x1', 'dil_conv'} <= set(_op_words())
  source = '\n'.join([
      '"""A module docstring: sep_conv_3x3 and none are prose here."""',
      "def f(op):",
      "  '''skip_connect in a docstring'''",
      "  if op != 'none':",
      "    return f'|{op}~0|+|nor_conv_3x3~0|'",
      "  return op.startswith('dil_conv') or 'none of them'",
  ])
  assert _hits(source) == [(4, 'none'), (5, '~0|+|nor_conv_3x3~0|'), (6, 'dil_conv')]


def test_no_module_outside_the_spaces_names_an_op():
  found = {}
  for folder, subfolders, files in os.walk(PACKAGE):
    rel_folder = os.path.relpath(folder, PACKAGE)
    if rel_folder.split(os.sep)[0] in OWN_FOLDERS:
      continue
    for name in files:
      rel = os.path.normpath(os.path.join(rel_folder, name))
      if name.endswith('.py'):
        with open(os.path.join(folder, name)) as f:
          hits = _hits(f.read())
        if hits:
          found[rel] = hits
  assert found == {}, ('these modules name ops of a space; read them from the space value '
                       f'(spaces.get(name)) or move the code into the space\'s files: {found}')


def test_every_space_names_its_zero_op():
  for space in spaces.SPACES.values():
    assert space.zero_op == 'none' and space.op_names[0] == 'none'
  with pytest.raises(ValueError, match="space darts: zero_op 'zero' is not one of its ops"):
    dataclasses.replace(spaces.get('darts'), zero_op='zero')
