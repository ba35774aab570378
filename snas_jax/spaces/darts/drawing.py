"""The DARTS cell's drawing: one derived cell (``Genotype.normal`` or
``.reduce``) as a PNG, with graphviz ``dot`` when it is on PATH, else with
matplotlib as an arc diagram (reporting.py's shared pieces): the states
c_{k-2}, c_{k-1}, 0..3, c_{k} on one line, edges from the cell inputs
below it, edges between intermediate nodes and the (unlabelled, grey)
concatenation into c_{k} above it.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Sequence

from matplotlib.patches import Circle, FancyArrowPatch
from matplotlib.path import Path

from snas_jax import reporting
from snas_jax.spaces.darts.genotypes import CELL_TYPES, CONCAT, NUM_INPUT_STATES, NUM_NODES

_INPUT_NAMES = ('c_{k-2}', 'c_{k-1}')
_OUTPUT_NAME = 'c_{k}'


def _state_name(state: int) -> str:
  return _INPUT_NAMES[state] if state < NUM_INPUT_STATES else str(state - NUM_INPUT_STATES)


def _drawn_edges(cell) -> list[tuple[str, int, int]]:
  """(op, from state, to node) for every edge that is drawn (not 'none')."""
  if len(cell) != NUM_NODES:
    raise ValueError(f'draw_cell: expected {NUM_NODES} nodes, got {len(cell)}')
  return [(op, int(state), node) for node, edges in enumerate(cell)
          for op, state in edges if op != 'none']


def draw_cell(cell, path: str, title: str = '', concat: Sequence[int] = CONCAT) -> str:
  """Draws one derived cell (``Genotype.normal`` or ``.reduce``) to a PNG at ``path``.

  Uses graphviz ``dot`` if it is on PATH (also leaving ``<path minus .png>.dot``),
  otherwise, or if ``dot`` fails, matplotlib. 'none' edges are not drawn; a
  node without inputs is drawn dashed. Returns ``path``.
  """
  edges = _drawn_edges(cell)
  dot = shutil.which('dot')
  if dot:
    try:
      return _draw_cell_graphviz(dot, edges, path, title, concat)
    except (OSError, subprocess.SubprocessError) as e:
      logging.warning('graphviz failed to draw %s (%s); drawing with matplotlib', path, e)
  return _draw_cell_matplotlib(edges, path, title, concat)


def _dot_source(edges, title: str, concat) -> str:
  q = lambda s: '"' + str(s).replace('\\', '\\\\').replace('"', '\\"') + '"'
  fed = {node for _, _, node in edges}
  lines = [
      'digraph cell {',
      '  rankdir=LR;',
      f'  label={q(title)}; labelloc=t; fontsize=20; fontname=helvetica;',
      '  node [style="rounded,filled", shape=rect, fontsize=20, height=0.5, width=0.5, '
      'penwidth=2, fontname=helvetica];',
      '  edge [fontsize=16, fontname=helvetica];',
  ]
  for name in _INPUT_NAMES:
    lines.append(f'  {q(name)} [fillcolor=darkseagreen2];')
  for node in range(NUM_NODES):
    style = '' if node in fed else ', style="rounded,filled,dashed", fillcolor=gray90'
    lines.append(f'  {q(node)} [fillcolor=lightblue{style}];')
  lines.append(f'  {q(_OUTPUT_NAME)} [fillcolor=palegoldenrod];')
  for op, state, node in edges:
    lines.append(f'  {q(_state_name(state))} -> {q(node)} [label={q(op)}, fillcolor=gray];')
  for state in concat:
    lines.append(f'  {q(_state_name(state))} -> {q(_OUTPUT_NAME)} [fillcolor=gray, color=gray40];')
  lines.append('}')
  return '\n'.join(lines) + '\n'


def _draw_cell_graphviz(dot: str, edges, path: str, title: str, concat) -> str:
  dot_path = os.path.splitext(path)[0] + '.dot'
  reporting.write_atomic(dot_path, lambda f: f.write(_dot_source(edges, title, concat)))
  tmp = reporting.atomic_path(path)
  try:
    subprocess.run([dot, '-Tpng', '-o', tmp, dot_path], check=True, capture_output=True,
                   timeout=60)
    with open(tmp, 'rb') as f:
      if f.read(8) != b'\x89PNG\r\n\x1a\n':
        raise subprocess.SubprocessError('dot did not write a PNG')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _draw_cell_matplotlib(edges, path: str, title: str, concat) -> str:
  # Column of each state on the line; 'out' is c_{k}.
  col = {s: s for s in range(NUM_INPUT_STATES + NUM_NODES)}
  col['out'] = NUM_INPUT_STATES + NUM_NODES
  x = {k: reporting.X_STEP * c for k, c in col.items()}
  fed = {node for _, _, node in edges}
  # Tallest arcs: c_{k-2} -> node 3 below, node 0 -> c_{k} above.
  y_low = -(reporting.ARC_HEIGHT * (NUM_INPUT_STATES + NUM_NODES - 1) + 0.4)
  y_high = reporting.ARC_HEIGHT * NUM_NODES + 0.4 + (0.7 if title else 0.0)
  fig, ax = reporting.cell_canvas(12.0, (-0.8, x['out'] + 0.8), (y_low, y_high), title, x['out'] / 2, 14)

  def draw_node(key, label, face, dashed=False):
    ax.add_patch(Circle((x[key], 0.0), reporting.NODE_RADIUS, facecolor=face, edgecolor='black',
                        linewidth=1.5, linestyle='--' if dashed else '-', zorder=3))
    ax.text(x[key], 0.0, label, ha='center', va='center', fontsize=12, zorder=4)

  for state, name in enumerate(_INPUT_NAMES):
    draw_node(state, f'${name}$', '#c1ffc1')
  for node in range(NUM_NODES):
    draw_node(node + NUM_INPUT_STATES, str(node),
              '#add8e6' if node in fed else '#eeeeee', dashed=node not in fed)
  draw_node('out', f'${_OUTPUT_NAME}$', '#eee8aa')
  ax.text(-0.6, y_low + 0.2, 'grey dashed arrows: concatenation into $c_{k}$'
          + ('' if fed == set(range(NUM_NODES)) else ';  dashed node: no inputs (zeros)'),
          ha='left', va='bottom', fontsize=8.5, color='0.4')

  def arrow(src, dst, height, color, width, style='-'):
    start, ctrl, end = reporting.arc(x[src], x[dst], height)
    curve = Path([start, ctrl, end], [Path.MOVETO, Path.CURVE3, Path.CURVE3])
    ax.add_patch(FancyArrowPatch(path=curve, arrowstyle='-|>', mutation_scale=14, color=color,
                                 linewidth=width, linestyle=style, zorder=2))
    return reporting.bezier(start, ctrl, end, 0.5)

  for state in concat:
    arrow(state, 'out', reporting.ARC_HEIGHT * (col['out'] - col[state]), '0.65', 1.1, '--')
  for op, state, node in edges:
    dst = node + NUM_INPUT_STATES
    sign = -1.0 if state < NUM_INPUT_STATES else 1.0
    lx, ly = arrow(state, dst, sign * reporting.ARC_HEIGHT * (col[dst] - col[state]), '0.1', 1.4)
    ax.text(lx, ly, op, ha='center', va='center', fontsize=8.5, zorder=5,
            bbox=dict(boxstyle='round,pad=0.15', facecolor='white', edgecolor='none', alpha=0.9))
  return reporting.save_figure(fig, path)


def draw(genotype, folder: str, tag: str) -> list:
  """The space's drawing: ``normal_<tag>.png`` and ``reduce_<tag>.png`` in ``folder``."""
  return [draw_cell(getattr(genotype, t), os.path.join(folder, f'{t}_{tag}.png'),
                    f'{t} cell ({tag})', concat=genotype.concat) for t in CELL_TYPES]
