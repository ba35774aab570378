"""The paper's search step in PyTorch, for docs/performance.md's comparison.

  pip install torch && python experiments/bench_pytorch.py

The SNAS/DARTS search network as the authors' PyTorch code builds it
(docs/algorithm.md §1: the 8 ops with non-affine BN, pools followed by BN,
FactorizedReduce, ReLU-Conv-BN preprocessing, stem conv + BN, 8 cells,
reductions at L//3 and 2L//3, global pooling and a linear head), written here
from that description, and SNAS's step on it: Gumbel-softmax samples of Z,
one forward and backward pass, SGD on w and Adam on α. Synthetic 32×32
images; prints init, the median step and images/s as one JSON line.
torch is not one of snas_jax's dependencies: this script alone needs it.
"""
import argparse
import json
import resource
import statistics
import time

try:
  import torch
  import torch.nn as nn
  import torch.nn.functional as F
except ImportError:
  raise SystemExit('error: this benchmark needs PyTorch: pip install torch') from None

PRIMITIVES = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3',
              'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')


def relu_conv_bn(c_in, c_out, k, stride, pad, dilation=1, groups=1):
  return [nn.ReLU(), nn.Conv2d(c_in, c_out, k, stride, pad, dilation, groups, bias=False)]


class DilConv(nn.Sequential):
  def __init__(self, c_in, c_out, k, stride, pad, dilation):
    super().__init__(*relu_conv_bn(c_in, c_in, k, stride, pad, dilation, c_in),
                     nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, affine=False))


class SepConv(nn.Sequential):
  def __init__(self, c_in, c_out, k, stride, pad):
    super().__init__(DilConv(c_in, c_in, k, stride, pad, 1), DilConv(c_in, c_out, k, 1, pad, 1))


class FactorizedReduce(nn.Module):
  def __init__(self, c_in, c_out):
    super().__init__()
    self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.bn = nn.BatchNorm2d(c_out, affine=False)

  def forward(self, x):
    x = F.relu(x)
    return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def make_op(name, c, stride):
  if name == 'max_pool_3x3':
    return nn.Sequential(nn.MaxPool2d(3, stride, 1), nn.BatchNorm2d(c, affine=False))
  if name == 'avg_pool_3x3':
    return nn.Sequential(nn.AvgPool2d(3, stride, 1, count_include_pad=False),
                         nn.BatchNorm2d(c, affine=False))
  if name == 'skip_connect':
    return nn.Identity() if stride == 1 else FactorizedReduce(c, c)
  k = int(name[-1])
  if name.startswith('sep'):
    return SepConv(c, c, k, stride, k // 2)
  return DilConv(c, c, k, stride, 2 * (k // 2), 2)


class MixedOp(nn.Module):
  def __init__(self, c, stride):
    super().__init__()
    self.ops = nn.ModuleList(make_op(p, c, stride) for p in PRIMITIVES[1:])  # 'none' adds 0

  def forward(self, x, z):
    return sum(w * op(x) for w, op in zip(z[1:], self.ops))


class Cell(nn.Module):
  def __init__(self, c_pp, c_p, c, reduction, reduction_prev):
    super().__init__()
    self.reduction = reduction
    self.pre0 = (FactorizedReduce(c_pp, c) if reduction_prev else
                 nn.Sequential(*relu_conv_bn(c_pp, c, 1, 1, 0), nn.BatchNorm2d(c, affine=False)))
    self.pre1 = nn.Sequential(*relu_conv_bn(c_p, c, 1, 1, 0), nn.BatchNorm2d(c, affine=False))
    self.edges = nn.ModuleList(MixedOp(c, 2 if reduction and j < 2 else 1)
                               for i in range(4) for j in range(i + 2))

  def forward(self, s0, s1, z):
    states, e = [self.pre0(s0), self.pre1(s1)], 0
    for i in range(4):
      states.append(sum(self.edges[e + j](h, z[e + j]) for j, h in enumerate(states)))
      e += len(states) - 1
    return torch.cat(states[2:], dim=1)


class Network(nn.Module):
  def __init__(self, c=16, layers=8, classes=10):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, 3 * c, 3, padding=1, bias=False), nn.BatchNorm2d(3 * c))
    c_pp = c_p = 3 * c
    cells, reduction_prev = [], False
    for i in range(layers):
      reduction = i in (layers // 3, 2 * layers // 3)
      c *= 2 if reduction else 1
      cells.append(Cell(c_pp, c_p, c, reduction, reduction_prev))
      c_pp, c_p, reduction_prev = c_p, 4 * c, reduction
    self.cells = nn.ModuleList(cells)
    self.classifier = nn.Linear(c_p, classes)
    self.alpha_normal = nn.Parameter(1 + 1e-2 * torch.randn(14, 8))
    self.alpha_reduce = nn.Parameter(1 + 1e-2 * torch.randn(14, 8))

  def forward(self, x, tau):
    z_n = F.gumbel_softmax(self.alpha_normal, tau=tau)
    z_r = F.gumbel_softmax(self.alpha_reduce, tau=tau)
    s0 = s1 = self.stem(x)
    for cell in self.cells:
      s0, s1 = s1, cell(s0, s1, z_r if cell.reduction else z_n)
    return self.classifier(s1.mean((2, 3)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--threads', type=int, default=0, help='0: PyTorch\'s default')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  t = time.perf_counter()
  net = Network()
  alphas = [net.alpha_normal, net.alpha_reduce]
  weights = [p for n, p in net.named_parameters() if not n.startswith('alpha')]
  w_opt = torch.optim.SGD(weights, 0.025, momentum=0.9, weight_decay=3e-4)
  a_opt = torch.optim.Adam(alphas, 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
  init_s = time.perf_counter() - t
  x = torch.randn(args.batch_size, 3, 32, 32)
  y = torch.randint(0, 10, (args.batch_size,))
  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    w_opt.zero_grad()
    a_opt.zero_grad()
    loss = F.cross_entropy(net(x, 1.0), y)
    loss.backward()
    nn.utils.clip_grad_norm_(weights, 5.0)
    w_opt.step()
    a_opt.step()
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  step = statistics.median(times)
  params = sum(p.numel() for p in weights)
  print(json.dumps({'framework': f'pytorch {torch.__version__}', 'threads': torch.get_num_threads(),
                    'params': params, 'batch_size': args.batch_size, 'init_s': round(init_s, 2),
                    'step_s': round(step, 3), 'images_per_s': round(args.batch_size / step, 2),
                    'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


if __name__ == '__main__':
  main()
