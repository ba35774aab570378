"""What the benchmarks share: the machine's name, the kernel count of a
compiled program, and the table + JSON report."""
import json
import os
import platform
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
