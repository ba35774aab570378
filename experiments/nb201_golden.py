"""Writes tests/data/nb201_golden.npz: AutoDL-Projects' numbers on tiny NAS-Bench-201 networks.

  pip install torch xautodl==1.0.0 && python experiments/nb201_golden.py

Built from xautodl's own PyTorch modules (models/cell_searchs/search_model_darts.py's
TinyNetworkDarts, models/cell_infers/tiny_network.py's TinyNetwork), with
weights drawn as experiments/pytorch_golden.py draws them, and stored in its
format (its ``save``/``load``). Cases:

* 'search': the supernet, C = 4, N = 1 (a cell per stage and both residual
  blocks), 16×16 images, batch 4: TinyNetworkDarts' stem, cells, head and
  mixture Σ_k Z_k·op_k(x) with a given soft Z [6, 5] in place of softmax(α)
  (non-affine BN in the cells, running statistics tracked);
* 'search_untracked': the same with ``track_running_stats=False`` in the cells;
* 'child': TinyNetwork with ``CHILD_ARCH`` (every op), C = 4, N = 1, 16×16, batch 4;

each with its inputs, 'params' and 'batch_stats' in the Flax layout
(``to_flax``), and PyTorch's results of one training pass: 'logits', the
cross-entropy 'loss', 'grads' of every parameter (and 'grad_z'),
'new_batch_stats', then 'eval_logits' (evaluation mode with those
statistics). And 'counts': per arch of ``COUNT_ARCHS`` and per class count
of ``COUNT_CLASSES``, TinyNetwork's parameters ('params' [archs, 2]) and
xautodl's FLOP count ('flops', ``xautodl.utils.get_model_infos``: conv and
linear multiply-adds plus the linear bias) at NB201's C = 16, N = 5, 32×32.
tests/test_nb201.py compares snas_jax.spaces.nb201 with it.
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOLDEN = os.path.join(ROOT, 'tests', 'data', 'nb201_golden.npz')
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
if HERE not in sys.path:
  sys.path.append(HERE)

import pytorch_golden  # noqa: E402  (the file format and the weight draws)
from snas_jax.spaces import nb201  # noqa: E402

SEED = 0
SEARCH = dict(c=4, n=1, image_size=16, batch=4, tau=1.0)
CHILD = dict(c=4, n=1, image_size=16, batch=4)
CHILD_ARCH = '|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|none~1|nor_conv_3x3~2|'
CLASSES = pytorch_golden.CLASSES
COUNT_C, COUNT_N, COUNT_IMAGE_SIZE = 16, 5, 32
COUNT_CLASSES = (10, 100)
COUNT_ARCHS = (
    # all nor_conv_3x3, all skip, the ResNet cell, three drawn at random, one with no path.
    '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|',
    '|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|',
    '|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|none~2|',
    '|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|nor_conv_3x3~1|none~2|',
    '|none~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|',
    '|nor_conv_1x1~0|+|skip_connect~0|none~1|+|avg_pool_3x3~0|nor_conv_1x1~1|avg_pool_3x3~2|',
    '|none~0|+|none~0|nor_conv_3x3~1|+|none~0|nor_conv_1x1~1|none~2|',
)

flatten = pytorch_golden.flatten


def load(path: str = GOLDEN) -> dict:
  return pytorch_golden.load(path)


# ----------------------------------------------------------------------------
# xautodl's state_dict names -> the Flax variables of snas_jax.spaces.nb201.


def _module_path(parts: list) -> tuple:
  """(Flax module path, row of Z or None) of a torch module path (its name split on '.')."""
  fixed = {('stem', '0'): ('stem_conv',), ('stem', '1'): ('stem_bn',),
           ('lastact', '0'): ('lastact_bn',), ('classifier',): ('classifier',)}
  if tuple(parts) in fixed:
    return fixed[tuple(parts)], None
  if parts[0] != 'cells':
    raise ValueError(f'unexpected module {".".join(parts)}')
  cell, rest = f'cell_{parts[1]}', parts[2:]
  layer = {'1': 'conv', '2': 'bn'}
  if rest[0] in ('conv_a', 'conv_b') and rest[1] == 'op':  # ReLUConvBN: op.1 conv, op.2 BN
    return (cell, rest[0], layer[rest[2]]), None
  if rest == ['downsample', '1']:  # AvgPool2d, then the 1x1 conv
    return (cell, 'downsample'), None
  if rest[0] == 'edges':  # NAS201SearchCell: edges['i<-j'][k].op
    node, state = map(int, rest[1].split('<-'))
    return ((cell, f'edges_from_{state}', nb201.OP_NAMES[int(rest[2])], layer[rest[4]]),
            nb201.EDGES.index((node - 1, state)))
  if rest[0] == 'layers':  # InferCell: layers[l] is the edge of row l (every edge listed)
    node, state = nb201.EDGES[int(rest[1])]
    return (cell, f'edge_{node + 1}_{state}', layer[rest[3]]), None
  raise ValueError(f'unexpected module {".".join(parts)}')


def _leaf(name: str, value: np.ndarray) -> tuple:
  """(collection, Flax name, value in the Flax layout) of a torch tensor."""
  if name == 'weight' and value.ndim == 4:
    return 'params', 'kernel', value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if name == 'weight' and value.ndim == 2:
    return 'params', 'kernel', value.T
  if name == 'weight':
    return 'params', 'scale', value
  if name == 'bias':
    return 'params', 'bias', value
  if name in ('running_mean', 'running_var'):
    return 'batch_stats', name[len('running_'):], value
  raise ValueError(f'unexpected tensor {name}')


def to_flax(state_dict) -> dict:
  """{'params': ..., 'batch_stats': ...} in the Flax layout; a dict of gradients keyed as
  named_parameters maps onto 'params'. A search cell's edges stack along a leading axis in
  the order of their edge batch."""
  import torch
  out = {'params': {}, 'batch_stats': {}}
  stacked = {}
  for key, value in state_dict.items():
    *parts, name = key.split('.')
    if name == 'num_batches_tracked':
      continue
    value = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    collection, name, value = _leaf(name, np.array(value, np.float32))
    path, row = _module_path(parts)
    if row is None:
      node = out[collection]
      for part in path:
        node = node.setdefault(part, {})
      node[name] = value
    else:
      stacked.setdefault((collection, path, name), {})[row] = value
  for (collection, path, name), by_row in stacked.items():
    rows = next(r for s, _, r in nb201.EDGE_BATCHES if f'edges_from_{s[0]}' == path[1])
    node = out[collection]
    for part in path:
      node = node.setdefault(part, {})
    node[name] = np.stack([by_row[r] for r in rows])
  return out


# ----------------------------------------------------------------------------
# The cases.


def _z(rng: np.random.Generator, tau: float) -> np.ndarray:
  """A soft Gumbel-softmax sample [6, 5] of α = 1 + 0.01·N(0, 1)."""
  shape = (len(nb201.EDGES), len(nb201.OP_NAMES))
  logits = 1 + 0.01 * rng.standard_normal(shape) - np.log(-np.log(rng.uniform(size=shape)))
  e = np.exp((logits - logits.max(-1, keepdims=True)) / tau)
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _run(net, case: dict, forward, z=None) -> dict:
  """PyTorch's training pass (results into ``case``), then the evaluation logits."""
  import torch
  import torch.nn.functional as F
  case.update(to_flax(net.state_dict()))
  net.train()
  image = torch.from_numpy(case['image'].transpose(0, 3, 1, 2).copy())
  label = torch.from_numpy(case['label']).long()
  logits = forward(image)
  loss = F.cross_entropy(logits, label)
  loss.backward()
  case['loss'] = np.float32(loss.item())
  case['logits'] = logits.detach().numpy().copy()
  case['grads'] = to_flax({n: p.grad for n, p in net.named_parameters()})['params']
  if z is not None:
    case['grad_z'] = z.grad.numpy().copy()
  case['new_batch_stats'] = to_flax(net.state_dict())['batch_stats']
  net.eval()
  with torch.no_grad():
    case['eval_logits'] = forward(image).numpy().copy()
  return case


def search_case(rng: np.random.Generator, track_running_stats: bool = True) -> dict:
  import torch
  import pytorch_reference  # needs torch
  cfg = SEARCH
  net = pytorch_reference.nb201_supernet(cfg['c'], cfg['n'], CLASSES, track_running_stats)
  with torch.no_grad():
    pytorch_golden._randomize(net, rng)
  case = pytorch_golden._inputs(rng, cfg['batch'], cfg['image_size'])
  case['z'] = _z(rng, cfg['tau'])
  z = torch.from_numpy(case['z']).requires_grad_()
  return _run(net, case, lambda x: net(x, z), z)


def child_case(rng: np.random.Generator) -> dict:
  import torch
  from xautodl.models.cell_infers.tiny_network import TinyNetwork
  from xautodl.models.cell_searchs.genotypes import Structure
  cfg = CHILD
  net = TinyNetwork(cfg['c'], cfg['n'], Structure.str2structure(CHILD_ARCH), CLASSES)
  with torch.no_grad():
    pytorch_golden._randomize(net, rng)
  case = pytorch_golden._inputs(rng, cfg['batch'], cfg['image_size'])
  return _run(net, case, lambda x: net(x)[1])


def count_case() -> dict:
  """TinyNetwork's parameters and xautodl's FLOPs for every arch of COUNT_ARCHS and class count."""
  from xautodl.models.cell_infers.tiny_network import TinyNetwork
  from xautodl.models.cell_searchs.genotypes import Structure
  from xautodl.utils import get_model_infos
  params = np.zeros((len(COUNT_ARCHS), len(COUNT_CLASSES)), np.int32)
  flops = np.zeros_like(params)
  for a, arch in enumerate(COUNT_ARCHS):
    for k, classes in enumerate(COUNT_CLASSES):
      net = TinyNetwork(COUNT_C, COUNT_N, Structure.str2structure(arch), classes)
      params[a, k] = sum(p.numel() for p in net.parameters())
      mflops, _ = get_model_infos(net, (1, 3, COUNT_IMAGE_SIZE, COUNT_IMAGE_SIZE))
      flops[a, k] = round(mflops * 1e6)
  return {'params': params, 'flops': flops}


def generate() -> dict:
  """Every case, computed now by PyTorch and xautodl: {'search', 'search_untracked', 'child',
  'counts'}."""
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny networks; leave the cores to XLA in a process that runs both
  try:
    rng = np.random.default_rng(SEED)
    return {'search': search_case(rng), 'search_untracked': search_case(rng, False),
            'child': child_case(rng), 'counts': count_case()}
  finally:
    torch.set_num_threads(threads)


def main():
  try:
    import torch  # noqa: F401
    import xautodl  # noqa: F401
  except ImportError:
    raise SystemExit('error: the golden file is AutoDL-Projects\' output: '
                     'pip install torch xautodl==1.0.0') from None
  pytorch_golden.save(GOLDEN, generate())
  print(f'wrote {os.path.relpath(GOLDEN, ROOT)}: {os.path.getsize(GOLDEN):,} bytes')


if __name__ == '__main__':
  main()
