"""The paper's search step in PyTorch, for docs/performance.md's comparison.

  pip install torch && python experiments/bench_pytorch.py
  python experiments/bench_pytorch.py --device=cuda --dtype=bfloat16 --channels_last
  pip install --no-deps xautodl && python experiments/bench_pytorch.py --space=nb201

The SNAS/DARTS search network as the authors' PyTorch code builds it
(docs/algorithm.md §1: the 8 ops with non-affine BN, pools followed by BN,
FactorizedReduce, ReLU-Conv-BN preprocessing, stem conv + BN, 8 cells,
reductions at L//3 and 2L//3, global pooling and a linear head; built by
experiments/pytorch_reference.py), and SNAS's step on it: Gumbel-softmax
samples of Z, one forward and backward pass, SGD on w and Adam on α.
Synthetic images; prints init, the first step, the median step, images/s
and peak memory as one JSON line. On a GPU (``--device=auto`` picks it),
``--dtype=bfloat16`` runs the forward pass under autocast and
``--channels_last`` the NHWC layout (experiments/bench_gpu.py runs both
beside this code's step). ``--space=nb201``: NAS-Bench-201's supernet as
AutoDL-Projects builds it (its TinyNetworkDarts), the same step.
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

import pytorch_reference  # noqa: E402  (needs torch, imported above)


class Network(pytorch_reference.SearchNetwork):
  """The search network with its architecture logits; forward draws Z."""

  def __init__(self, c=16, layers=8, classes=10):
    super().__init__(c, layers, classes)
    self.alpha_normal = nn.Parameter(1 + 1e-2 * torch.randn(14, 8))
    self.alpha_reduce = nn.Parameter(1 + 1e-2 * torch.randn(14, 8))

  def forward(self, x, tau):
    z_n = F.gumbel_softmax(self.alpha_normal, tau=tau)
    z_r = F.gumbel_softmax(self.alpha_reduce, tau=tau)
    return super().forward(x, z_n, z_r)


class NB201Network(nn.Module):
  """NAS-Bench-201's supernet (AutoDL-Projects' TinyNetworkDarts modules, C
  channels, N cells per stage) with its one α [6, 5]; forward draws Z."""

  def __init__(self, c=16, n=5, classes=10):
    super().__init__()
    self.supernet = pytorch_reference.nb201_supernet(c, n, classes)
    self.alpha = nn.Parameter(1 + 1e-2 * torch.randn(6, 5))

  def forward(self, x, tau):
    return self.supernet(x, F.gumbel_softmax(self.alpha, tau=tau))


NETWORKS = {'darts': Network, 'nb201': NB201Network}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--channels', type=int, default=16, help='C of the search network')
  parser.add_argument('--space', default='darts', choices=tuple(NETWORKS),
                      help='darts: the SNAS/DARTS search network; nb201: NAS-Bench-201\'s '
                      'supernet (needs pip install --no-deps xautodl)')
  parser.add_argument('--layers', type=int, default=0, help='cells of the search network '
                      '(darts; default 8) or cells per stage N (nb201; default 5)')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--threads', type=int, default=0, help='0: PyTorch\'s default')
  parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                      help='auto: cuda where PyTorch sees a GPU, else cpu')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='bfloat16: the forward pass under torch.autocast (weights, optimiser '
                      'state and BN statistics float32)')
  parser.add_argument('--channels_last', action='store_true',
                      help='NHWC memory layout for the network and the images')
  args = parser.parse_args()
  args.layers = args.layers or {'darts': 8, 'nb201': 5}[args.space]
  print(json.dumps(measure(args)))


def measure(args) -> dict:
  """Init, the first step (cuDNN's autotuning under cudnn.benchmark, as the
  authors' code sets it), the median step and peak memory of one configuration."""
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device(args.device if args.device != 'auto' else
                        'cuda' if torch.cuda.is_available() else 'cpu')
  cuda = device.type == 'cuda'
  torch.backends.cudnn.benchmark = True
  sync = torch.cuda.synchronize if cuda else lambda: None
  layout = torch.channels_last if args.channels_last else torch.contiguous_format
  torch.manual_seed(0)
  t = time.perf_counter()
  net = NETWORKS[args.space](args.channels, args.layers).to(device, memory_format=layout)
  alphas = [p for n, p in net.named_parameters() if n.startswith('alpha')]
  weights = [p for n, p in net.named_parameters() if not n.startswith('alpha')]
  w_opt = torch.optim.SGD(weights, 0.025, momentum=0.9, weight_decay=3e-4)
  a_opt = torch.optim.Adam(alphas, 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
  sync()
  init_s = time.perf_counter() - t
  size = args.image_size
  x = torch.randn(args.batch_size, 3, size, size, device=device).to(memory_format=layout)
  y = torch.randint(0, 10, (args.batch_size,), device=device)
  autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == 'bfloat16')
  times = []
  for i in range(1 + args.warmup + args.steps):
    t = time.perf_counter()
    w_opt.zero_grad()
    a_opt.zero_grad()
    with autocast:
      logits = net(x, 1.0)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    nn.utils.clip_grad_norm_(weights, 5.0)
    w_opt.step()
    a_opt.step()
    sync()
    times.append(time.perf_counter() - t)
  step = statistics.median(times[1 + args.warmup:])
  params = sum(p.numel() for p in weights)
  peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else '-'
  return {'framework': f'pytorch {torch.__version__}', 'device': str(device),
          'device_kind': torch.cuda.get_device_name(device) if cuda else 'cpu',
          'threads': torch.get_num_threads(), 'dtype': args.dtype,
          'channels_last': args.channels_last, 'space': args.space, 'params': params,
          'batch_size': args.batch_size,
          'channels': args.channels, 'layers': args.layers, 'image_size': size,
          'init_s': round(init_s, 2), 'first_step_s': round(times[0], 2),
          'step_s': round(step, 3), 'images_per_s': round(args.batch_size / step, 2),
          'device_peak_gb': peak,
          'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


if __name__ == '__main__':
  main()
