"""The SNAS/DARTS networks in PyTorch, as the authors' code builds them, and
the map of their weights onto this code's Flax variables.

Written here from docs/algorithm.md's description: the search network (§1:
the 8 ops with non-affine BN, pools followed by BN, FactorizedReduce,
ReLU-Conv-BN preprocessing, stem conv + BN, reductions at L//3 and 2L//3,
global average pooling and a linear head; Z given per cell type) and the
CIFAR child network with its auxiliary head (§7: affine BN everywhere, the
pools keep their BN). Without drop-path: a training pass of the authors'
code with drop-path probability 0 skips it.

Submodules carry the names of the Flax modules they stand for, so
``to_flax`` is a renaming plus layout transposes (and, in a search cell, the
stacking of an edge batch's weights along a leading axis).

Also NAS-Bench-201's supernet, from AutoDL-Projects' own modules
(``nb201_supernet``). Users: experiments/bench_pytorch.py (speed),
experiments/pytorch_golden.py and nb201_golden.py (numerical agreement, for
tests/test_pytorch_fidelity.py and tests/test_nb201.py). torch is not a
dependency of snas_jax; this module needs it.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Column order of Z, as snas_jax.spaces.darts.genotypes.PRIMITIVES.
PRIMITIVES = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3',
              'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
NUM_NODES = 4
# NAS-Bench-201: Z's columns as snas_jax.spaces.nb201.OP_NAMES; 4 nodes with the input.
NB201_OPS = ('none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')
NB201_NODES = 4


def conv(c_in, c_out, k, stride=1, dilation=1, groups=1):
  """Bias-free conv padded by dilation·(K−1)/2 on each side."""
  return nn.Conv2d(c_in, c_out, k, stride, dilation * (k - 1) // 2, dilation, groups, bias=False)


class ReLUConvBN(nn.Module):
  def __init__(self, c_in, c_out, affine):
    super().__init__()
    self.conv = conv(c_in, c_out, 1)
    self.bn = nn.BatchNorm2d(c_out, affine=affine)

  def forward(self, x):
    return self.bn(self.conv(F.relu(x)))


class FactorizedReduce(nn.Module):
  def __init__(self, c_in, c_out, affine):
    super().__init__()
    self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.bn = nn.BatchNorm2d(c_out, affine=affine)

  def forward(self, x):
    x = F.relu(x)
    return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class DilConv(nn.Module):
  """ReLU -> depthwise KxK (stride, dilation) -> 1x1 -> BN."""

  def __init__(self, c_in, c_out, k, stride, dilation, affine):
    super().__init__()
    self.depthwise = conv(c_in, c_in, k, stride, dilation, groups=c_in)
    self.pointwise = conv(c_in, c_out, 1)
    self.bn = nn.BatchNorm2d(c_out, affine=affine)

  def forward(self, x):
    return self.bn(self.pointwise(self.depthwise(F.relu(x))))


class SepConv(nn.Module):
  def __init__(self, c_in, c_out, k, stride, affine):
    super().__init__()
    self.dil_0 = DilConv(c_in, c_in, k, stride, 1, affine)
    self.dil_1 = DilConv(c_in, c_out, k, 1, 1, affine)

  def forward(self, x):
    return self.dil_1(self.dil_0(x))


class Pool(nn.Module):
  """3x3 max or average pool (padding left out of the average's count), then BN."""

  def __init__(self, kind, c, stride, affine):
    super().__init__()
    self.pool = (nn.MaxPool2d(3, stride, 1) if kind == 'max' else
                 nn.AvgPool2d(3, stride, 1, count_include_pad=False))
    self.bn = nn.BatchNorm2d(c, affine=affine)

  def forward(self, x):
    return self.bn(self.pool(x))


class Zero(nn.Module):
  def __init__(self, stride):
    super().__init__()
    self.stride = stride

  def forward(self, x):
    return x[:, :, ::self.stride, ::self.stride].mul(0.)


def make_op(name, c, stride, affine):
  if name == 'none':
    return Zero(stride)
  if name in ('max_pool_3x3', 'avg_pool_3x3'):
    return Pool(name[:3], c, stride, affine)
  if name == 'skip_connect':
    return nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine)
  k = int(name[-1])
  if name.startswith('sep'):
    return SepConv(c, c, k, stride, affine)
  return DilConv(c, c, k, stride, 2, affine)


def preprocess(c_pp, c_p, c, reduction_prev, affine):
  pre0 = FactorizedReduce(c_pp, c, affine) if reduction_prev else ReLUConvBN(c_pp, c, affine)
  return pre0, ReLUConvBN(c_p, c, affine)


class MixedOp(nn.Module):
  """Σ_k z[k]·op_k(x); 'none' adds z·0 and is left out."""

  def __init__(self, c, stride):
    super().__init__()
    for p in PRIMITIVES[1:]:
      self.add_module(p, make_op(p, c, stride, False))

  def forward(self, x, z):
    return sum(z[PRIMITIVES.index(p)] * op(x) for p, op in self.named_children())


class SearchCell(nn.Module):
  """14 mixed edges, numbered node by node and within a node by source state."""

  def __init__(self, c_pp, c_p, c, reduction, reduction_prev):
    super().__init__()
    self.reduction = reduction
    self.preprocess0, self.preprocess1 = preprocess(c_pp, c_p, c, reduction_prev, False)
    self.edges = nn.ModuleList(MixedOp(c, 2 if reduction and state < 2 else 1)
                               for node in range(NUM_NODES) for state in range(node + 2))

  def forward(self, s0, s1, z):
    states, e = [self.preprocess0(s0), self.preprocess1(s1)], 0
    for _ in range(NUM_NODES):
      states.append(sum(self.edges[e + j](h, z[e + j]) for j, h in enumerate(states)))
      e += len(states) - 1
    return torch.cat(states[2:], dim=1)


class SearchNetwork(nn.Module):
  """forward(images [N,3,H,W], z_normal [14,8], z_reduce [14,8]) -> logits."""

  def __init__(self, c=16, layers=8, classes=10):
    super().__init__()
    self.stem_conv = conv(3, 3 * c, 3)
    self.stem_bn = nn.BatchNorm2d(3 * c)
    c_pp = c_p = 3 * c
    cells, reduction_prev = [], False
    for i in range(layers):
      reduction = i in (layers // 3, 2 * layers // 3)
      c *= 2 if reduction else 1
      cells.append(SearchCell(c_pp, c_p, c, reduction, reduction_prev))
      c_pp, c_p, reduction_prev = c_p, NUM_NODES * c, reduction
    self.cells = nn.ModuleList(cells)
    self.classifier = nn.Linear(c_p, classes)

  def forward(self, x, z_normal, z_reduce):
    s0 = s1 = self.stem_bn(self.stem_conv(x))
    for cell in self.cells:
      s0, s1 = s1, cell(s0, s1, z_reduce if cell.reduction else z_normal)
    return self.classifier(s1.mean((2, 3)))


class ChildCell(nn.Module):
  """A genotype's cell: ``cell`` per node ((op, input state), ...); the node
  sums its edges (a 'none' edge adds zeros), the output concatenates ``concat``."""

  def __init__(self, cell, concat, c_pp, c_p, c, reduction, reduction_prev):
    super().__init__()
    self.cell, self.concat = cell, concat
    self.preprocess0, self.preprocess1 = preprocess(c_pp, c_p, c, reduction_prev, True)
    for node, edges in enumerate(cell):
      for j, (name, state) in enumerate(edges):
        stride = 2 if reduction and state < 2 else 1
        self.add_module(f'node{node}_edge{j}_{name}', make_op(name, c, stride, True))

  def forward(self, s0, s1):
    states = [self.preprocess0(s0), self.preprocess1(s1)]
    for node, edges in enumerate(self.cell):
      states.append(sum(getattr(self, f'node{node}_edge{j}_{name}')(states[state])
                        for j, (name, state) in enumerate(edges)))
    return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
  """ReLU, 5x5 average pool stride 3, 1x1 conv 128, BN, ReLU, 2x2 conv 768, BN, ReLU, linear.

  The authors' head starts with an in-place ReLU, which also rectifies the
  cell output it reads; every later reader of that output starts with a ReLU
  too, so the out-of-place ReLU here computes the same network whenever the
  head does not follow the last cell.
  """

  def __init__(self, c, classes):
    super().__init__()
    self.conv0 = nn.Conv2d(c, 128, 1, bias=False)
    self.bn0 = nn.BatchNorm2d(128)
    self.conv1 = nn.Conv2d(128, 768, 2, bias=False)
    self.bn1 = nn.BatchNorm2d(768)
    self.classifier = nn.Linear(768, classes)

  def forward(self, x):
    x = F.avg_pool2d(F.relu(x), 5, 3, 0, count_include_pad=False)
    x = F.relu(self.bn0(self.conv0(x)))
    x = F.relu(self.bn1(self.conv1(x)))
    return self.classifier(x.flatten(1))


class NetworkCIFAR(nn.Module):
  """forward(images [N,3,H,W]) -> (logits, auxiliary logits in training with
  ``auxiliary``, else None). ``genotype`` has .normal, .reduce and .concat."""

  def __init__(self, genotype, c, layers, classes=10, auxiliary=True):
    super().__init__()
    self.aux_after = 2 * layers // 3
    self.stem_conv = conv(3, 3 * c, 3)
    self.stem_bn = nn.BatchNorm2d(3 * c)
    c_pp = c_p = 3 * c
    cells, reduction_prev = [], False
    for i in range(layers):
      reduction = i in (layers // 3, 2 * layers // 3)
      c *= 2 if reduction else 1
      cell = genotype.reduce if reduction else genotype.normal
      cells.append(ChildCell(cell, genotype.concat, c_pp, c_p, c, reduction, reduction_prev))
      c_pp, c_p, reduction_prev = c_p, len(genotype.concat) * c, reduction
      if i == self.aux_after and auxiliary:
        self.auxiliary_head = AuxiliaryHeadCIFAR(c_p, classes)
    self.cells = nn.ModuleList(cells)
    self.classifier = nn.Linear(c_p, classes)

  def forward(self, x):
    s0 = s1 = self.stem_bn(self.stem_conv(x))
    aux = None
    for i, cell in enumerate(self.cells):
      s0, s1 = s1, cell(s0, s1)
      if i == self.aux_after and hasattr(self, 'auxiliary_head') and self.training:
        aux = self.auxiliary_head(s1)
    return self.classifier(s1.mean((2, 3))), aux


# ----------------------------------------------------------------------------
def _leaf(name: str, value: np.ndarray):
  """(collection, Flax leaf name, value in Flax layout) of one state_dict entry."""
  if name == 'weight' and value.ndim == 4:  # conv [O, I/groups, kh, kw] -> [kh, kw, I/groups, O]
    return 'params', 'kernel', value.transpose(2, 3, 1, 0)
  if name == 'weight' and value.ndim == 2:  # linear [out, in] -> [in, out]
    return 'params', 'kernel', value.T
  if name == 'weight':  # BN
    return 'params', 'scale', value
  if name == 'bias':
    return 'params', 'bias', value
  if name in ('running_mean', 'running_var'):
    return 'batch_stats', name[len('running_'):], value
  raise ValueError(f'no Flax counterpart for state_dict entry {name!r}')


def _stack(trees):
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def to_flax(state_dict) -> dict:
  """{'params': ..., 'batch_stats': ...} in the Flax layout of the network
  this state_dict (name -> tensor or array) belongs to; a dict of gradients
  keyed as named_parameters maps the same way, onto 'params'.

  Names: ``cells.i`` -> ``cell_i``; a search cell's ``edges.row`` join the
  edge batch holding that row (snas_jax.spaces.darts.genotypes.edge_batches),
  stacked in the batch's order; ``num_batches_tracked`` has no counterpart.
  """
  from snas_jax.spaces.darts.genotypes import edge_batches
  from snas_jax.layers import edge_batch_name
  out = {'params': {}, 'batch_stats': {}}
  for key, value in state_dict.items():
    *path, name = key.split('.')
    if name == 'num_batches_tracked':
      continue
    value = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    collection, name, value = _leaf(name, value)
    node = out[collection]
    parts = iter(path)
    for part in parts:
      if part == 'cells':
        part = f'cell_{next(parts)}'
      elif part == 'edges':
        node = node.setdefault('edges', {})
        part = int(next(parts))
      node = node.setdefault(part, {})
    node[name] = np.array(value, np.float32)  # a copy: a tensor's numpy view changes with it
  for tree in out.values():
    for cell in tree.values():
      edges = cell.pop('edges', None) if isinstance(cell, dict) else None
      if edges is not None:
        for sources, _, rows in edge_batches():
          if rows[0] in edges:  # ops without variables in this collection leave none
            cell[edge_batch_name(sources)] = _stack([edges[r] for r in rows])
  return out


def nb201_supernet(c: int, n: int, classes: int, track_running_stats: bool = True) -> nn.Module:
  """NAS-Bench-201's supernet as AutoDL-Projects builds it (xautodl's
  TinyNetworkDarts modules: stem, N cells per stage, residual blocks, head),
  called ``(images, z)`` with Z [6, 5] in place of its softmax(α). Needs
  ``pip install --no-deps xautodl``."""
  from xautodl.models.cell_searchs.search_cells import NAS201SearchCell
  from xautodl.models.cell_searchs.search_model_darts import TinyNetworkDarts

  class SupernetGivenZ(nn.Module):
    def __init__(self):
      super().__init__()
      darts = TinyNetworkDarts(c, n, NB201_NODES, classes, list(NB201_OPS),
                               affine=False, track_running_stats=track_running_stats)
      # TinyNetworkDarts' modules but not its α (arch_parameters): Z is an input here.
      self.stem, self.cells, self.lastact = darts.stem, darts.cells, darts.lastact
      self.global_pooling, self.classifier = darts.global_pooling, darts.classifier

    def forward(self, x, z):  # TinyNetworkDarts.forward with z for softmax(arch_parameters)
      feature = self.stem(x)
      for cell in self.cells:
        feature = cell(feature, z) if isinstance(cell, NAS201SearchCell) else cell(feature)
      out = self.global_pooling(self.lastact(feature))
      return self.classifier(out.view(out.size(0), -1))

  return SupernetGivenZ()
