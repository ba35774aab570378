"""Writes tests/data/pytorch_golden.npz: PyTorch's numbers on tiny SNAS networks.

  pip install torch && python experiments/pytorch_golden.py

Two cases, built by experiments/pytorch_reference.py with seeded weights,
batches of 4: 'search' (the search network, C = 2, 3 cells: a normal cell
and both reductions, 16×16 images, a fixed soft Z per cell type) and 'child'
(NetworkCIFAR with SNAS_moderate, C = 4, 4 cells, 32×32 images: the
auxiliary head's 8×8 input, loss CE + 0.4·CE_aux). The channel counts keep
the file near 0.5 MB. Random BN scales, offsets and running statistics
make every BN convention visible. Each case holds, in the Flax layout
(pytorch_reference.to_flax), the inputs, 'params' and 'batch_stats', and
PyTorch's results of one training pass: 'logits' ('aux_logits'), 'loss',
'grads' of every parameter (and 'grad_z_normal', 'grad_z_reduce'),
'new_batch_stats' (the BN running statistics after it), then 'eval_logits'
(evaluation mode with those statistics). No drop-path.
tests/test_pytorch_fidelity.py compares this code's networks with it.

Arrays over PACK_SIZE values (the auxiliary head's 768-channel kernel and its
gradient) are stored as low-rank factors: the kernel is drawn with rank 4, and
its gradient has rank at most the batch size, a sum of one outer product per
image (the conv's output is 1×1). ``pack`` checks that the factors give the
array back to float32 rounding.
"""
import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOLDEN = os.path.join(ROOT, 'tests', 'data', 'pytorch_golden.npz')
# snas_jax from this checkout, and pytorch_reference beside this file (appended:
# a test that loads this file keeps its own imports first).
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
if HERE not in sys.path:
  sys.path.append(HERE)

SEED = 0
SEARCH = dict(c=2, layers=3, image_size=16, batch=4, tau=1.0)
CHILD = dict(genotype='SNAS_moderate', c=4, layers=4, image_size=32, batch=4, aux_weight=0.4)
CLASSES = 10
PACK_SIZE = 100_000
PACK_RANK = 4


def pack(x: np.ndarray) -> tuple:
  """(u, v) with x.reshape(-1, last axis) = u @ v.T to float32 rounding (a truncated SVD)."""
  a = x.reshape(-1, x.shape[-1]).astype(np.float64)
  u, s, vt = np.linalg.svd(a, full_matrices=False)
  u, v = u[:, :PACK_RANK] * s[:PACK_RANK], vt[:PACK_RANK].T
  error = np.abs(u @ v.T - a).max()
  if error > 2.0**-22 * np.abs(a).max():
    raise ValueError(f'an array of shape {x.shape} is not of rank {PACK_RANK}: error {error:.3g}')
  return u, v


def unpack(u: np.ndarray, v: np.ndarray, shape) -> np.ndarray:
  """float32(u @ v.T) in the given shape, summed elementwise in a fixed order
  (no BLAS): the same bits on every machine."""
  a = np.zeros((u.shape[0], v.shape[0]))
  for r in range(u.shape[1]):
    a += np.multiply.outer(u[:, r], v[:, r])
  return a.astype(np.float32).reshape(tuple(shape))


def flatten(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f'{prefix}{k}/') if isinstance(v, dict) else {prefix + k: v})
  return out


def unflatten(flat: dict) -> dict:
  tree = {}
  for key, value in flat.items():
    *path, leaf = key.split('/')
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _float16_exact(x: np.ndarray) -> bool:
  return x.dtype == np.float32 and np.array_equal(x.astype(np.float16).astype(np.float32), x)


def save(path: str, cases: dict) -> None:
  """Writes the cases losslessly, per case one vector per storage type:
  float32 arrays whose values are float16 numbers (the drawn inputs and
  weights) as float16, other float32 as float32, integers as int32; an array
  over PACK_SIZE values as low-rank factors, its ``'_factors'`` (a drawn
  kernel) or else ``pack``'s. A JSON index says where each array lies."""
  arrays = {}
  for name, case in cases.items():
    factors = case.get('_factors', {})
    buckets = {'float16': [], 'float32': [], 'int32': []}
    index = []
    for key, x in flatten({k: v for k, v in case.items() if k != '_factors'}).items():
      x = np.asarray(x)
      if x.size > PACK_SIZE:
        arrays[f'{name}/{key}@u'], arrays[f'{name}/{key}@v'] = (
            factors[key] if key in factors else pack(x))
        index.append((key, x.shape, 'packed', 0))
        continue
      kind = ('int32' if np.issubdtype(x.dtype, np.integer) else
              'float16' if _float16_exact(x) else 'float32')
      index.append((key, x.shape, kind, sum(a.size for a in buckets[kind])))
      buckets[kind].append(x.astype(kind).ravel())
    for kind, parts in buckets.items():
      arrays[f'{name}@{kind}'] = np.concatenate(parts) if parts else np.zeros(0, kind)
    arrays[f'{name}@index'] = np.frombuffer(json.dumps(index).encode(), np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez_compressed(path, **arrays)


def load(path: str = GOLDEN) -> dict:
  """The cases as nested dicts of arrays (float32 and int32)."""
  with np.load(path) as f:
    arrays = dict(f)
  cases = {}
  for entry in arrays:
    if not entry.endswith('@index'):
      continue
    name = entry[:-len('@index')]
    flat = {}
    for key, shape, kind, offset in json.loads(arrays[entry].tobytes()):
      if kind == 'packed':
        flat[key] = unpack(arrays[f'{name}/{key}@u'], arrays[f'{name}/{key}@v'], shape)
      else:
        x = arrays[f'{name}@{kind}'][offset:offset + int(np.prod(shape))].reshape(shape)
        flat[key] = x.astype(np.int32 if kind == 'int32' else np.float32)
    cases[name] = unflatten(flat)
  return cases


# ----------------------------------------------------------------------------
def _half(x) -> np.ndarray:
  """x rounded to float16 numbers, as float32: stored in half the bytes, losslessly."""
  return np.asarray(x, np.float16).astype(np.float32)


def _randomize(net, rng: np.random.Generator) -> dict:
  """Seeded weights: conv and linear weights and biases U(±1/√fan_in) (PyTorch's
  default), but kernels over PACK_SIZE values of rank PACK_RANK; BN scales in
  [0.5, 1.5], offsets and running means N(0, 0.1²), running variances in
  [0.5, 1.5]. Returns the low-rank kernels' factors in the Flax layout, by
  their key in ``flatten(to_flax(...))``."""
  import torch
  from pytorch_reference import to_flax
  factors = {}
  for name, t in net.state_dict().items():
    leaf = name.rsplit('.', 1)[-1]
    shape = tuple(t.shape)
    if leaf == 'num_batches_tracked':
      continue
    if leaf == 'weight' and len(shape) > 1:
      bound = 1 / math.sqrt(np.prod(shape[1:]))
      if t.numel() > PACK_SIZE:  # a conv kernel [O, I, kh, kw]: factors over (kh, kw, I) x O
        u = rng.uniform(-1, 1, (int(np.prod(shape[1:])), PACK_RANK))
        v = rng.uniform(-1, 1, (shape[0], PACK_RANK))
        u *= bound / np.abs(u @ v.T).max()
        x = unpack(u, v, shape[2:] + shape[1:2] + shape[:1]).transpose(3, 2, 0, 1)
        key, = flatten(to_flax({name: x})).keys()
        factors[key] = (u, v)
      else:
        x = _half(rng.uniform(-bound, bound, shape))
    elif leaf == 'weight':
      x = _half(rng.uniform(0.5, 1.5, shape))
    elif leaf == 'bias' and name.endswith('classifier.bias'):
      x = _half(rng.uniform(-1, 1, shape) / math.sqrt(net.get_submodule(name[:-5]).in_features))
    elif leaf in ('bias', 'running_mean'):
      x = _half(0.1 * rng.standard_normal(shape))
    elif leaf == 'running_var':
      x = _half(rng.uniform(0.5, 1.5, shape))
    else:
      raise ValueError(f'unexpected state_dict entry {name}')
    t.copy_(torch.from_numpy(np.ascontiguousarray(x)))
  return factors


def _z(rng: np.random.Generator, tau: float) -> np.ndarray:
  """A soft Gumbel-softmax sample [14, 8] of α = 1 + 0.01·N(0, 1) (docs/algorithm.md §2)."""
  logits = (1 + 0.01 * rng.standard_normal((14, 8)) - np.log(-np.log(rng.uniform(size=(14, 8)))))
  e = np.exp((logits - logits.max(-1, keepdims=True)) / tau)
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _inputs(rng, batch, size) -> dict:
  return {'image': _half(rng.standard_normal((batch, size, size, 3))),
          'label': rng.integers(0, CLASSES, batch).astype(np.int32)}


def _run(net, case: dict, forward, loss_fn, extra_grads=()) -> dict:
  """PyTorch's training pass (results into ``case``), then evaluation logits."""
  import torch
  from pytorch_reference import to_flax
  case.update(to_flax(net.state_dict()))
  net.train()
  image = torch.from_numpy(case['image'].transpose(0, 3, 1, 2).copy())
  label = torch.from_numpy(case['label']).long()
  outputs = forward(image)
  loss = loss_fn(outputs, label)
  loss.backward()
  case['loss'] = np.float32(loss.item())
  case['grads'] = to_flax({n: p.grad for n, p in net.named_parameters()})['params']
  for name, tensor in extra_grads:
    case[name] = tensor.grad.numpy().copy()
  case['new_batch_stats'] = to_flax(net.state_dict())['batch_stats']
  for name, out in outputs.items():
    case[name] = out.detach().numpy().copy()
  net.eval()
  with torch.no_grad():
    case['eval_logits'] = forward(image)['logits'].numpy().copy()
  return case


def search_case(rng: np.random.Generator) -> dict:
  import torch
  import torch.nn.functional as F
  from pytorch_reference import SearchNetwork
  cfg = SEARCH
  net = SearchNetwork(cfg['c'], cfg['layers'], CLASSES)
  with torch.no_grad():
    factors = _randomize(net, rng)
  case = _inputs(rng, cfg['batch'], cfg['image_size'])
  case['_factors'] = factors
  case['z_normal'], case['z_reduce'] = _z(rng, cfg['tau']), _z(rng, cfg['tau'])
  z_n = torch.from_numpy(case['z_normal']).requires_grad_()
  z_r = torch.from_numpy(case['z_reduce']).requires_grad_()
  return _run(net, case, lambda x: {'logits': net(x, z_n, z_r)},
              lambda out, y: F.cross_entropy(out['logits'], y),
              extra_grads=(('grad_z_normal', z_n), ('grad_z_reduce', z_r)))


def child_case(rng: np.random.Generator) -> dict:
  import torch
  import torch.nn.functional as F
  from pytorch_reference import NetworkCIFAR
  from snas_jax.spaces.darts import genotypes
  cfg = CHILD
  net = NetworkCIFAR(genotypes.published(cfg['genotype']), cfg['c'], cfg['layers'], CLASSES)
  with torch.no_grad():
    factors = _randomize(net, rng)
  case = _inputs(rng, cfg['batch'], cfg['image_size'])
  case['_factors'] = factors

  def forward(x):
    logits, aux = net(x)
    return {'logits': logits} if aux is None else {'logits': logits, 'aux_logits': aux}

  def loss_fn(out, y):
    return F.cross_entropy(out['logits'], y) + cfg['aux_weight'] * F.cross_entropy(
        out['aux_logits'], y)

  return _run(net, case, forward, loss_fn)


def generate() -> dict:
  """Both cases, computed now by PyTorch: {'search': {...}, 'child': {...}}."""
  import torch
  threads = torch.get_num_threads()
  # One thread: the networks are tiny, and spinning OpenMP threads would
  # compete with XLA's in a process that runs both.
  torch.set_num_threads(1)
  try:
    rng = np.random.default_rng(SEED)
    return {'search': search_case(rng), 'child': child_case(rng)}
  finally:
    torch.set_num_threads(threads)


def main():
  try:
    import torch  # noqa: F401
  except ImportError:
    raise SystemExit('error: the golden file is PyTorch\'s output: pip install torch') from None
  cases = generate()
  save(GOLDEN, cases)
  print(f'wrote {os.path.relpath(GOLDEN, ROOT)}: {os.path.getsize(GOLDEN):,} bytes')


if __name__ == '__main__':
  main()
