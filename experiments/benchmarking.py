"""What the benchmarks share: the machine's name, the kernel count of a
compiled program, one configuration per process, and the table + JSON report."""
import json
import os
import platform
import subprocess
from typing import Iterable


def machine() -> str:
  """'<CPU model>, <n> cores'."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{cpu}, {os.cpu_count()} cores'


def fused_kernels(compiled) -> int | None:
  """Fusions in the optimised program: what XLA:CPU emits a kernel for, the
  driver of its compile time (~11 ms each here) and, unlike that time, not
  moved by the machine's load."""
  try:
    return sum(' = ' in line and ' fusion(' in line for line in compiled.as_text().splitlines())
  except Exception:  # an executable without its HLO text (some cache loads)
    return None


def run_json_process(argv: list, row: dict, env: dict | None = None,
                     timeout: float | None = None) -> dict:
  """Runs ``argv``, a process that measures one configuration and prints it
  as its last JSON line; returns that line, or ``row`` with an 'error' (its
  exit status and last line of stderr, or the timeout) so that one failed
  configuration leaves the others' figures."""
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**row, 'error': f'timed out after {timeout:.0f} s'}
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    return {**row, 'error': f'exit {proc.returncode}: {tail[:200]}'}
  return json.loads(lines[-1])


def report(env: dict, cols: tuple, rows: Iterable[dict], json_out: str = '') -> list:
  """Prints ``env`` as JSON, a table of ``cols`` with each row as it comes
  (and its error, if any), then every row as JSON; also writes them to
  ``json_out``. Returns the rows."""
  print(json.dumps(env))
  print(' | '.join(cols))
  results = []
  for r in rows:
    results.append(r)
    print(' | '.join(str(r.get(c, '-')) for c in cols) +
          (f' | {r["error"]}' if 'error' in r else ''), flush=True)
  for r in results:
    print(json.dumps(r))
  if json_out:
    with open(json_out, 'w') as f:
      json.dump({'environment': env, 'results': results}, f, indent=1)
  return results
