"""The paper's search step in PyTorch, for docs/performance.md's comparison.

  pip install torch && python experiments/bench_pytorch.py

The SNAS/DARTS search network as the authors' PyTorch code builds it
(docs/algorithm.md §1: the 8 ops with non-affine BN, pools followed by BN,
FactorizedReduce, ReLU-Conv-BN preprocessing, stem conv + BN, 8 cells,
reductions at L//3 and 2L//3, global pooling and a linear head; built by
experiments/pytorch_reference.py), and SNAS's step on it: Gumbel-softmax
samples of Z, one forward and backward pass, SGD on w and Adam on α.
Synthetic 32×32 images; prints init, the median step and images/s as one
JSON line.
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

from pytorch_reference import SearchNetwork  # noqa: E402  (needs torch, imported above)


class Network(SearchNetwork):
  """The search network with its architecture logits; forward draws Z."""

  def __init__(self, c=16, layers=8, classes=10):
    super().__init__(c, layers, classes)
    self.alpha_normal = nn.Parameter(1 + 1e-2 * torch.randn(14, 8))
    self.alpha_reduce = nn.Parameter(1 + 1e-2 * torch.randn(14, 8))

  def forward(self, x, tau):
    z_n = F.gumbel_softmax(self.alpha_normal, tau=tau)
    z_r = F.gumbel_softmax(self.alpha_reduce, tau=tau)
    return super().forward(x, z_n, z_r)


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
