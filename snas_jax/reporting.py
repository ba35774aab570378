"""What a run shows a person: metric logs, progress bars, α plots, and the
pieces the spaces draw their cells with.

Metrics go to ``workdir/metrics.jsonl`` (one JSON object per ``write``) and to
TensorBoard scalars under ``workdir/tensorboard/``. Only process 0 writes.

Plots use matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so
they need no screen and leave the caller's pyplot state alone. Every file is
written to a temporary name in the same folder and renamed into place, so an
interrupted run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import sys
import uuid
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

# Choose the headless backend only if nobody chose one: a caller that already
# imported pyplot (e.g. a notebook) keeps its backend. The plots below attach
# an Agg canvas explicitly, so they render headless either way.
if 'matplotlib.pyplot' not in sys.modules and 'MPLBACKEND' not in os.environ:
  matplotlib.use('Agg')

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'

# write_search_report's curves.png: panel title -> metric keys.
CURVE_PANELS = {
    'accuracy': ['train_acc', 'search_val_acc', 'child_acc', 'bench_cifar10_valid_acc'],
    'alpha entropy': ['alpha_entropy_normal', 'alpha_entropy_reduce', 'alpha_entropy_cell'],
    'cost': ['expected_params', 'child_params'],
    'flops': ['expected_flops', 'child_flops'],
    'temperature': ['tau'],
}


def _default_is_writer() -> bool:
  # Imported here, not at module level, so that merely importing this module
  # (e.g. for plotting) does not initialise JAX's backends.
  import jax
  return jax.process_index() == 0


# --------------------------------------------------------------------------
# Atomic file writes.


def atomic_path(path: str) -> str:
  """An unused temporary name next to ``path`` (same filesystem, so rename is atomic)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  # Not tempfile.mkstemp: its files are mode 0600 whatever the umask, and the
  # renamed file should be as readable as any other output.
  return os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')


def _write_atomic(path: str, write_fn, mode: str = 'w') -> str:
  """Calls ``write_fn(file)`` on a temporary file, then renames it to ``path``."""
  tmp = atomic_path(path)
  try:
    with open(tmp, mode.replace('w', 'x')) as f:
      write_fn(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


# The project's one atomic writer (loop.write_json uses it too).
write_atomic = _write_atomic


def save_figure(fig: Figure, path: str) -> str:
  FigureCanvasAgg(fig)  # Attaches a headless canvas whatever the global backend.
  return _write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=fig.dpi), mode='wb')


# --------------------------------------------------------------------------
# Metrics.


def _to_json_value(value: Any, key: str) -> Any:
  """Python floats/ints/bools/str/None, numpy or jax scalars and arrays, lists -> JSON."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, Mapping):
    return {str(k): _to_json_value(v, f'{key}.{k}') for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json_value(v, key) for v in value]
  if isinstance(value, np.generic) or hasattr(value, '__array__'):
    # jax.Array and numpy arrays/scalars; np.asarray fetches a device value.
    arr = np.asarray(value)
    if arr.dtype.kind == 'V':
      arr = arr.astype(np.float64)  # ml_dtypes such as bfloat16 that json cannot take.
    elif arr.dtype.kind not in 'biufUS':
      raise TypeError(f'metric {key!r}: cannot log an array of dtype {arr.dtype}')
    return arr.item() if arr.ndim == 0 else arr.tolist()
  raise TypeError(f'metric {key!r}: cannot log a value of type {type(value).__name__}; '
                  f'use a number, a numpy/jax array or a list')


def _is_scalar(value: Any) -> bool:
  return isinstance(value, (bool, int, float))


def _read_lines(path: str) -> list[dict]:
  """Parses a JSON-lines file; skips lines that do not parse (a crash mid-write)."""
  records = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning('%s:%d is not valid JSON (interrupted write?); skipping it', path, lineno)
  return records


def read_metrics(workdir: str) -> list[dict]:
  """Every record in ``workdir/metrics.jsonl`` in write order; [] if there is none."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  return _read_lines(path)


class MetricsWriter:
  """Writes metrics to ``workdir/metrics.jsonl`` and TensorBoard scalars.

  Each ``write`` appends one JSON object holding 'step', 'epoch' and the
  metrics. Scalars also go to TensorBoard (``workdir/tensorboard/``); lists,
  strings and None stay JSON-only. On processes other than 0 every method
  does nothing.

  ``resume_step=S`` drops existing lines whose step is > S, so a run restarted
  from a checkpoint at step S does not log steps S+1.. twice, and rebuilds
  ``tensorboard/`` from the lines kept (TensorBoard has no way to retract
  events, so the old event files are deleted and the kept scalars rewritten).
  With ``resume_step=None`` both logs are appended to as they are.
  """

  def __init__(self, workdir: str, resume_step: int | None = None,
               is_writer: bool | None = None, tensorboard: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    self.is_writer = _default_is_writer() if is_writer is None else bool(is_writer)
    self._file = None
    self._tb = None
    if not self.is_writer:
      return
    os.makedirs(workdir, exist_ok=True)
    kept = None
    if resume_step is not None:
      kept = self._truncate(int(resume_step))
    # Line-buffered: each record reaches the OS as soon as it is written.
    self._file = open(self.path, 'a', buffering=1)
    if tensorboard:
      tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
      if kept is not None and os.path.isdir(tb_dir):
        shutil.rmtree(tb_dir)
      self._tb = _create_tb_writer(tb_dir)
      for record in kept or ():
        self._write_tb(record)
      self._tb.flush()

  def _truncate(self, resume_step: int) -> list[dict]:
    """Drops lines with step > resume_step (rewriting the file); returns the rest."""
    if not os.path.exists(self.path):
      return []
    records = _read_lines(self.path)
    kept = [r for r in records if not (isinstance(r.get('step'), (int, float))
                                       and r['step'] > resume_step)]
    if len(kept) != len(records):
      logging.info('metrics: resuming at step %d, dropping %d later lines from %s',
                   resume_step, len(records) - len(kept), self.path)
    _write_atomic(self.path, lambda f: f.writelines(json.dumps(r) + '\n' for r in kept))
    return kept

  def _write_tb(self, record: Mapping[str, Any]):
    import tensorflow as tf  # already loaded by _create_tb_writer
    step = record.get('step')
    if not isinstance(step, int):
      return
    with self._tb.as_default(step=step):
      for key, value in record.items():
        if key not in ('step', 'epoch') and _is_scalar(value):
          tf.summary.write(key, tf.constant(float(value), tf.float32),
                           metadata=_scalar_metadata())

  def write(self, step: int, metrics: Mapping[str, Any], epoch: int | float | None = None):
    """Logs ``metrics`` at ``step``. ``epoch`` comes from the argument or metrics['epoch']."""
    if not self.is_writer:
      return
    if self._file is None:
      raise RuntimeError('MetricsWriter.write after close()')
    if epoch is None:
      epoch = metrics.get('epoch')
    if epoch is None:
      raise ValueError("MetricsWriter.write needs an epoch: pass epoch= or put 'epoch' in metrics")
    record = {'step': int(step), 'epoch': _to_json_value(epoch, 'epoch')}
    for key, value in metrics.items():
      if key in ('step', 'epoch'):
        continue
      record[str(key)] = _to_json_value(value, str(key))
    self._file.write(json.dumps(record) + '\n')
    if self._tb is not None:
      self._write_tb(record)

  def flush(self):
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@functools.lru_cache(maxsize=None)
def _scalar_metadata():
  """What tf.summary.scalar attaches, built from TF's own protos.

  tf.summary.scalar lives in the `tensorboard` package, which tensorflow-cpu
  does not pull in; tf.summary.write plus this metadata writes the identical
  event, so logging works without it and TensorBoard reads it as a scalar.
  """
  from snas_jax import data  # pylint: disable=g-import-not-at-top
  data.import_tensorflow()  # TF loads without its start-up banners
  from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
  metadata = summary_pb2.SummaryMetadata(data_class=summary_pb2.DATA_CLASS_SCALAR)
  metadata.plugin_data.plugin_name = 'scalars'
  return metadata


def _create_tb_writer(logdir: str):
  # Loads TF without its start-up banners and keeps it off the GPUs that JAX
  # is using (with tensorflow-cpu there is nothing to hide).
  from snas_jax import data  # pylint: disable=g-import-not-at-top
  tf = data.import_tensorflow()
  return tf.summary.create_file_writer(logdir)


# --------------------------------------------------------------------------
# Progress bar.


class ProgressBar:
  """A tqdm bar for one epoch (shows rate and ETA); silent off process 0 or if disabled.

  ``update(n, loss=..., acc=...)`` advances by n and shows the keyword values.
  Values are converted with float(), which waits for a jax value to be computed.
  """

  def __init__(self, total: int, desc: str = '', enabled: bool = True,
               is_writer: bool | None = None, unit: str = 'step', leave: bool = True):
    if is_writer is None:
      is_writer = _default_is_writer()
    self.enabled = bool(enabled) and bool(is_writer)
    self._bar = None
    if self.enabled:
      from tqdm import tqdm
      # Redirected to a log file, a bar redraws as a new line each time, so
      # redraw rarely there.
      interactive = getattr(sys.stderr, 'isatty', lambda: False)()
      self._bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                       mininterval=0.5 if interactive else 30.0)

  def update(self, n: int = 1, **postfix):
    if self._bar is None:
      return
    if postfix:
      self._bar.set_postfix({k: _format_postfix(v) for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def write(self, message: str):
    """Prints a line without breaking the bar."""
    if self._bar is not None:
      self._bar.write(message)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _format_postfix(value: Any) -> str:
  if isinstance(value, str):
    return value
  try:
    return f'{float(value):.4g}'
  except (TypeError, ValueError):
    return str(value)


# --------------------------------------------------------------------------
# Cell drawings: the shared pieces.

# The pieces every space's cell drawing is made of (spaces/darts/drawing.py,
# spaces/nb201.py): an arc diagram in data units with equal aspect. The states
# sit on one line, left to right; each edge is an arc whose height grows with
# the distance it spans, so arcs into the same node nest instead of
# overlapping and each label sits alone at its arc's apex.
NODE_RADIUS = 0.42
X_STEP = 2.0
ARC_HEIGHT = 0.5  # apex height per column spanned


def bezier(p0, c, p1, t):
  p0, c, p1 = map(np.asarray, (p0, c, p1))
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t ** 2 * p1


def arc(x0: float, x1: float, height: float):
  """Start, control point and end of a quadratic arc from x0 to x1 with apex ``height``."""
  # A quadratic Bezier's apex is half-way to its control point.
  ctrl = np.array([(x0 + x1) / 2, 2 * height])
  src, dst = np.array([x0, 0.0]), np.array([x1, 0.0])
  start = src + NODE_RADIUS * (ctrl - src) / np.linalg.norm(ctrl - src)
  end = dst + NODE_RADIUS * (ctrl - dst) / np.linalg.norm(ctrl - dst)
  return start, ctrl, end


def cell_canvas(width: float, x_lim: tuple, y_lim: tuple, title: str, title_x: float,
                fontsize: int):
  """(figure, axes) for a cell drawing: equal aspect, no axes, ``title`` on top."""
  (x_low, x_high), (y_low, y_high) = x_lim, y_lim
  fig = Figure(figsize=(width, width * (y_high - y_low) / (x_high - x_low)), dpi=120)
  ax = fig.add_axes([0.0, 0.0, 1.0, 1.0])
  ax.set_aspect('equal')
  ax.axis('off')
  ax.set_xlim(x_low, x_high)
  ax.set_ylim(y_low, y_high)
  if title:
    ax.text(title_x, y_high - 0.35, title, ha='center', va='center', fontsize=fontsize)
  return fig, ax


# --------------------------------------------------------------------------
# α heat map and curves.


def _softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _space(space):
  """``space`` (a SearchSpace or its name; None: the default, darts)."""
  from snas_jax import spaces  # imported late: the spaces draw with this module
  return spaces.as_space(space)


def plot_alpha_heatmap(alpha, path: str, title: str = '', space=None) -> str:
  """Heat map of softmax(α) per edge ([edges, ops] logits of ``space``), values to 2 decimals."""
  space = _space(space)
  alpha = np.asarray(alpha)
  if alpha.shape != space.arch_shape:
    raise ValueError(f'alpha must be [{space.num_edges}, {space.num_ops}] in the {space.name} '
                     f'space, got {list(alpha.shape)}')
  num_edges, num_ops = space.arch_shape
  probs = _softmax(alpha)
  fig = Figure(figsize=(10, 8), dpi=110)
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(probs, cmap='viridis', vmin=0.0, vmax=1.0, aspect='auto')
  fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
  ax.set_xticks(range(num_ops), labels=space.op_names, rotation=35, ha='right')
  ax.set_yticks(range(num_edges), labels=[f'node {n} <- state {s}' for n, s in space.edges])
  best = probs.argmax(-1)
  for r in range(num_edges):
    for c in range(num_ops):
      v = probs[r, c]
      # Bold marks each edge's argmax: the op SNAS derivation keeps.
      ax.text(c, r, f'{v:.2f}', ha='center', va='center', fontsize=8,
              color='black' if v > 0.6 else 'white',
              fontweight='bold' if c == best[r] else 'normal')
  # Lines between nodes' edge groups.
  row = 0
  for node in range(space.num_nodes - 1):
    row += node + space.num_input_states
    ax.axhline(row - 0.5, color='white', linewidth=2)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return save_figure(fig, path)


def _series(records: Iterable[dict], key: str) -> tuple[list, list]:
  xs, ys = [], []
  for r in records:
    x, y = r.get('epoch'), r.get(key)
    if _is_scalar(x) and _is_scalar(y) and not isinstance(y, bool):
      xs.append(float(x))
      ys.append(float(y))
  order = np.argsort(xs, kind='stable')
  return [xs[i] for i in order], [ys[i] for i in order]


def plot_curves(records: Sequence[dict], path: str,
                keys_by_panel: Mapping[str, Sequence[str]]) -> str:
  """One PNG, one panel per ``keys_by_panel`` entry (title -> metric keys), x = epoch.

  A key is drawn from the records that have it (and an 'epoch'); a panel with
  no data says so instead of disappearing, so the layout stays the same.
  """
  n = max(len(keys_by_panel), 1)
  cols = min(3, n)
  rows = math.ceil(n / cols)
  fig = Figure(figsize=(5.2 * cols, 3.8 * rows), dpi=110)
  for i, (panel, keys) in enumerate(keys_by_panel.items()):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.set_title(panel)
    ax.set_xlabel('epoch')
    drawn = 0
    for key in keys:
      xs, ys = _series(records, key)
      if not xs:
        continue
      ax.plot(xs, ys, label=key, marker='.' if len(xs) <= 60 else None, linewidth=1.5)
      drawn += 1
    if drawn:
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
    else:
      ax.text(0.5, 0.5, 'no data', ha='center', va='center', transform=ax.transAxes, color='0.5')
  fig.tight_layout()
  return save_figure(fig, path)


# --------------------------------------------------------------------------
# The end-of-search report.


def search_report_files(space=None) -> list[str]:
  """The names write_search_report writes for ``space`` (its derivation rules and cell types)."""
  space = _space(space)
  cells, rules = space.cell_types, tuple(space.derive_rules)
  return (['genotype.json'] + [f'alpha_{c}.npy' for c in cells]
          + [f'{c}_{rule}.png' for rule in rules for c in cells]
          + [f'alpha_{c}.png' for c in cells] + ['curves.png'])


def write_search_report(workdir: str, genotypes: Mapping[str, Any],
                        alphas: Mapping[str, Any], records: Sequence[dict],
                        space=None) -> list[str]:
  """Writes everything a finished search of ``space`` leaves besides checkpoints; returns the paths.

  genotype.json ({rule: genotype.to_dict()}), alpha_<cell type>.npy, the
  space's drawing of each rule's genotype (``<cell type>_<rule>.png``),
  alpha_<cell type>.png and curves.png (panels ``CURVE_PANELS``).
  """
  space = _space(space)
  os.makedirs(workdir, exist_ok=True)
  for rule in genotypes:
    if not rule or os.sep in rule or rule.startswith('.'):
      raise ValueError(f'derivation rule name {rule!r} cannot be used in a file name')
  missing = set(space.cell_types) - set(alphas)
  if missing:
    raise ValueError(f'alphas lacks {sorted(missing)}; pass one per cell type of the '
                     f'{space.name} space: {list(space.cell_types)}')
  paths = []
  out = lambda name: os.path.join(workdir, name)

  as_dict = {rule: g.to_dict() for rule, g in genotypes.items()}
  paths.append(_write_atomic(out('genotype.json'),
                             lambda f: f.write(json.dumps(as_dict, indent=2) + '\n')))
  for which in space.cell_types:
    alpha = np.asarray(alphas[which])
    paths.append(_write_atomic(out(f'alpha_{which}.npy'), lambda f: np.save(f, alpha), mode='wb'))
  for rule, g in genotypes.items():
    paths += space.draw(g, workdir, rule)
  for which in space.cell_types:
    paths.append(plot_alpha_heatmap(alphas[which], out(f'alpha_{which}.png'),
                                    f'softmax(alpha_{which}) per edge', space))
  paths.append(plot_curves(records, out('curves.png'), CURVE_PANELS))
  return paths
