"""Retraining a derived cell from scratch: CIFAR-10 and ImageNet (docs/algorithm.md §7).

Read top to bottom: Config, Architecture, Model size, Input, Model &
Optimizer, Update steps, Checkpoint, Task (what loop.run runs), Summary.

The architecture comes from exactly one of a finished search's workdir
(``--search_workdir``, through ``search.load_genotype``), a genotype JSON file
(``--genotype_json``, ``Genotype.to_json`` format) or a published cell
(``--arch``). The network is the DARTS space's ``child_model.NetworkCIFAR`` /
``NetworkImageNet``.

Data parallelism: one 'data' mesh over every device of every host; the train
state is replicated, each batch is split along its rows, and ``jax.jit``
inserts the gradient all-reduce (BN statistics are those of the global
batch). The learning rate is a per-epoch schedule of the update count
inside the optimizer and the drop-path rate enters the jitted step as an
array, so a new epoch never recompiles. A run resumes from its latest
checkpoint (every ``--checkpoint_every_steps`` and at each epoch end),
mid-epoch exactly on CIFAR-10 (batches are a pure function of seed, epoch and
index).

Outputs in ``--workdir``: ``checkpoints/``, ``metrics.jsonl`` (one record per
epoch), ``tensorboard/`` and, at the end, ``final.json`` with the test error.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Any, Callable, Iterable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jax_core

from snas_jax import backends, checkpoint, data, parallel
from snas_jax.spaces import nb201
from snas_jax.spaces.darts import child_model, genotypes
from snas_jax import loop, spaces
from snas_jax import config as config_lib
from snas_jax.config import BACKEND_HELP, field
from snas_jax.layers import INITS, reinitialize  # names: TrainConfig's field 'layers' hides the module

NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet': 1000}
CIFAR_IMAGE_SIZE = 32
MOBILE_MULTIPLY_ADDS = 600e6  # the ImageNet mobile setting's limit (docs/algorithm.md §7)
FINAL_FILE = 'final.json'
IMAGENET_SIZE_MULTIPLE = 32


# ----------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Retraining flags. Defaults: CIFAR-10, docs/algorithm.md §7 / App. G.2 (IMAGENET_DEFAULTS for ImageNet)."""
  # Architecture: exactly one of the three sources.
  search_workdir: str = field('', 'Workdir of a finished search: its derived genotype is trained '
                              '(restored through Orbax). One of --search_workdir, --genotype_json, '
                              '--arch.')
  derive_rule: str = field('snas', 'With --search_workdir or a search\'s genotype.json: the child '
                           'derived by the SNAS rule (argmax over all ops per edge) or the DARTS '
                           'rule (top-2 edges per node).',
                           choices=('snas', 'darts'))
  genotype_json: str = field('', 'Path to a genotype JSON file: {"normal": [[[op, input], ...] '
                             f'x {genotypes.NUM_NODES} nodes], "reduce": ..., "concat": '
                             f'{list(genotypes.CONCAT)}}} '
                             '(Genotype.to_json), or a search\'s genotype.json '
                             '({"snas": ..., "darts": ...}; --derive_rule picks).')
  arch: str = field('', 'darts: a published cell (' + ', '.join(genotypes.PUBLISHED) + '); '
                    f'nb201: an arch string, e.g. \'{nb201.EXAMPLE}\'.')
  # Network.
  space: str = field(spaces.DEFAULT, 'Search space of the cell (docs/spaces.md): darts '
                     '(NetworkCIFAR / NetworkImageNet) or nb201 (NAS-Bench-201\'s TinyNetwork; '
                     '--layers is its cells per stage N, CIFAR only).',
                     choices=tuple(spaces.SPACES))
  dataset: str = field('cifar10', 'Data set to train and test on (cifar100 and imagenet through '
                       'tensorflow-datasets).', choices=tuple(NUM_CLASSES))
  channels: int = field(36, 'Initial channels C (the first cells have C per node; doubles at each '
                        'reduction). Paper: 36 on CIFAR-10, 48 on ImageNet.')
  layers: int = field(20, 'Number of cells L; reduction cells at L//3 and 2L//3. Paper: 20 on '
                      'CIFAR-10, 14 on ImageNet.')
  image_size: int = field(224, 'ImageNet only: side of the square training/eval crops (CIFAR-10 is '
                          'always 32). Smaller values are for smoke tests.')
  auxiliary_weight: float = field(-1.0, 'Weight of the auxiliary head\'s loss (head after cell '
                                  '2L//3, training only); 0 removes the head. -1: the space\'s '
                                  '(darts 0.4; nb201 0, it has no head).')
  drop_path_prob: float = field(-1.0, 'Final drop-path rate, ramped linearly from 0 over the '
                                'epochs; per-sample, on every edge but the identity. -1: the '
                                'space\'s (darts 0.2; nb201 0, it has no drop-path).')
  remat: bool = field(False, 'Recompute more in the backward pass: less memory, more compute. '
                      'Each cell on the reference backend; on the CPU backend the '
                      'convolutions recompute their outputs before BN.')
  backend: str = field('auto', BACKEND_HELP, choices=backends.NAMES)
  dtype: str = field('float32', backends.DTYPE_HELP, choices=backends.DTYPES)
  init: str = field('auto', 'Initialisation: snas (the SNAS authors\' evaluation code: conv '
                    'weights N(0, 2/(k²·C_out)), dense Kaiming normal with zero bias; the '
                    'paper\'s numbers) or pytorch (PyTorch\'s defaults, as DARTS\'s code and '
                    'NAS-Bench-201\'s training). auto: darts snas, nb201 pytorch.',
                    choices=('auto',) + INITS)
  # Optimisation.
  batch_size: int = field(96, 'Global batch size (all devices and hosts together).')
  epochs: int = field(600, 'Training epochs.')
  learning_rate: float = field(0.025, 'Initial SGD learning rate.')
  lr_schedule: str = field('cosine', 'Per-epoch learning-rate schedule: cosine (to --lr_min at the '
                           'end; CIFAR-10) or exponential (x --lr_decay per epoch; ImageNet).',
                           choices=('cosine', 'exponential'))
  lr_min: float = field(0.0, 'Cosine schedule: the learning rate it anneals to.')
  lr_decay: float = field(0.97, 'Exponential schedule: factor per epoch.')
  momentum: float = field(0.9, 'SGD momentum.')
  weight_decay: float = field(3e-4, 'L2 weight decay (added to the gradient, as PyTorch SGD does).')
  grad_clip: float = field(5.0, 'Clip the gradient\'s global norm to this; 0 disables clipping.')
  label_smoothing: float = field(0.0, 'Label smoothing of the training loss (0.1 on ImageNet).')
  # Data.
  data_dir: str = field(data.AUTO, data.DATA_DIR_HELP)
  tfds_data_dir: str = field('', 'tfds data folder (ImageNet: imagenet2012, prepared from the '
                             'manual download); empty: the tfds default.')
  cutout: int = field(16, 'CIFAR-10: side of the cutout square (0 = off).')
  num_train_images: int = field(0, 'Train on only this many images (class-balanced subset on '
                                'CIFAR-10, the first batches on ImageNet); 0 = all. For quick '
                                'runs.')
  num_eval_images: int = field(0, 'Evaluate on only this many test images; 0 = all.')
  # Run.
  seed: int = field(0, 'Seed of the initialisation, data order, augmentation and drop-path.')
  checkpoint_every_steps: int = field(1000, 'Save a checkpoint every N steps (and at each epoch '
                                      'end); 0 = epoch ends only.')
  allow_large: bool = field(False, 'ImageNet: allow a network above the mobile setting\'s 600M '
                            'multiply-adds per image.')
  progress: bool = field(True, 'Show a progress bar per epoch.')
  stop_after_step: int = field(0, 'Checkpoint and stop once this global step is done, as if '
                               'preempted (0 = run to the end). For testing resume.')

  def __post_init__(self):
    # -1 / auto mean the space's own; the stored configuration holds the value used.
    for name, value in SPACE_DEFAULTS.get(self.space, {}).items():
      if getattr(self, name) in (-1.0, 'auto'):
        object.__setattr__(self, name, value)

  def check(self) -> None:
    config_lib.positive(self, 'channels', 'layers', 'image_size', 'batch_size', 'epochs',
                        'learning_rate')
    if self.channels % 2:
      raise ValueError(f'--channels={self.channels} must be even (FactorizedReduce halves it)')
    if self.space != 'darts':
      check_space_options(self)
    elif self.layers < genotypes.MIN_LAYERS:
      raise ValueError(f'--layers={self.layers} has no normal cell (reduction cells sit at L//3 '
                       f'and 2L//3), so the genotype\'s normal cell would be unused; use '
                       f'--layers >= {genotypes.MIN_LAYERS}')
    if self.dataset == 'imagenet' and self.image_size % IMAGENET_SIZE_MULTIPLE:
      raise ValueError(f'--image_size={self.image_size} must be a multiple of '
                       f'{IMAGENET_SIZE_MULTIPLE}: the stems halve it 3 times and the '
                       f'reduction cells twice more, each from an even side')
    if not 0 <= self.drop_path_prob < 1:
      raise ValueError(f'--drop_path_prob={self.drop_path_prob} must lie in [0, 1)')
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f'--label_smoothing={self.label_smoothing} must lie in [0, 1)')
    for name in ('auxiliary_weight', 'cutout', 'num_train_images', 'num_eval_images',
                 'checkpoint_every_steps', 'stop_after_step', 'weight_decay', 'grad_clip',
                 'lr_min', 'seed'):
      if getattr(self, name) < 0:
        raise ValueError(f'--{name} must be >= 0, got {getattr(self, name)}')
    if self.dataset == 'imagenet' and self.cutout:
      raise ValueError(f'--cutout={self.cutout} is CIFAR-10 only; pass --cutout=0 with ImageNet')
    arch_source(self)


# What -1 / auto of auxiliary_weight, drop_path_prob and init mean per space.
SPACE_DEFAULTS = {'darts': {'auxiliary_weight': 0.4, 'drop_path_prob': 0.2, 'init': 'snas'},
                  'nb201': {'auxiliary_weight': 0.0, 'drop_path_prob': 0.0, 'init': 'pytorch'}}


def check_space_options(config: 'TrainConfig') -> None:
  """The child of a space other than darts (NB201's TinyNetwork): CIFAR only,
  no auxiliary head, no drop-path, the reference backend."""
  flag = f'--space={config.space}'
  if config.dataset == 'imagenet':
    raise ValueError(f'{flag} is a CIFAR network: use --dataset=cifar10 or cifar100')
  if config.auxiliary_weight:
    raise ValueError(f'--auxiliary_weight={config.auxiliary_weight}: the {config.space} child '
                     f'has no auxiliary head; use --auxiliary_weight=0 with {flag}')
  if config.drop_path_prob:
    raise ValueError(f'--drop_path_prob={config.drop_path_prob}: the {config.space} child has '
                     f'no drop-path; use --drop_path_prob=0 with {flag}')
  spaces.get(config.space).check_network(config.layers, CIFAR_IMAGE_SIZE)


# train_imagenet.py's defaults (docs/algorithm.md §7, App. G.3 and the reference's
# train_imagenet.py: drop-path 0, no cutout, grad clip 5).
IMAGENET_DEFAULTS = dict(dataset='imagenet', channels=48, layers=14, batch_size=128, epochs=250,
                         learning_rate=0.1, lr_schedule='exponential', lr_decay=0.97,
                         weight_decay=3e-5, label_smoothing=0.1, drop_path_prob=0.0, cutout=0)


def imagenet_config(**overrides) -> TrainConfig:
  """A TrainConfig with the ImageNet mobile-setting defaults, then ``overrides``."""
  config = TrainConfig(**{**IMAGENET_DEFAULTS, **overrides})
  config_lib.validate(config)
  return config


def learning_rate_schedule(config: TrainConfig):
  """epoch (0-based) -> learning rate, constant within an epoch (ref): optax's
  cosine decay to --lr_min or staircase exponential decay by --lr_decay."""
  if config.lr_schedule == 'cosine':
    return loop.cosine_per_epoch(config.learning_rate, config.lr_min, config.epochs)
  return loop.exponential_per_epoch(config.learning_rate, config.lr_decay)


def learning_rate(config: TrainConfig, epoch: int) -> float:
  """The learning rate of epoch ``epoch`` (0-based), as a float32 (the records' 'lr')."""
  return float(learning_rate_schedule(config)(epoch))


def drop_path_rate(config: TrainConfig, epoch: int) -> float:
  """Linear ramp 0 -> drop_path_prob over the run, per epoch (ref)."""
  return config.drop_path_prob * epoch / config.epochs


# ----------------------------------------------------------------------------
# Architecture.


def arch_source(config: TrainConfig) -> str:
  """'search_workdir' | 'genotype_json' | 'arch', or a one-line error unless exactly one is set."""
  given = [name for name in ('search_workdir', 'genotype_json', 'arch') if getattr(config, name)]
  if len(given) != 1:
    got = ' and '.join(f'--{g}' for g in given) or 'none of them'
    raise ValueError(f'give exactly one of --search_workdir, --genotype_json, --arch (got {got})')
  return given[0]


def resolve_genotype(config: TrainConfig) -> genotypes.Genotype:
  """The genotype to train. Errors (bad source, unknown op, no finished search) are one line."""
  source = arch_source(config)
  space = spaces.get(config.space)
  if source == 'arch':
    return space.genotype_from_flag(config.arch)
  if source == 'genotype_json':
    path = config.genotype_json
    try:
      with open(path) as f:
        parsed = json.load(f)
    except OSError as e:
      raise ValueError(f'--genotype_json={path} cannot be read ({e.strerror})') from None
    except json.JSONDecodeError as e:
      raise ValueError(f'--genotype_json={path} is not valid JSON ({e.msg} at line '
                       f'{e.lineno})') from None
    # A search's genotype.json holds one genotype per derivation rule.
    if (isinstance(parsed, dict) and not {'normal', 'arch'} & set(parsed)
        and config.derive_rule in parsed):
      parsed = parsed[config.derive_rule]
    try:
      return space.genotype_type.from_dict(parsed)
    except (ValueError, TypeError, AttributeError) as e:
      raise ValueError(f'--genotype_json={path}: {" ".join(str(e).split())}') from None
  # Imported here: the search loop is only needed for this source.
  from snas_jax import search  # pylint: disable=g-import-not-at-top
  genotype = search.load_genotype(config.search_workdir, config.derive_rule)
  if not isinstance(genotype, space.genotype_type):
    searched = next(name for name, s in spaces.SPACES.items()
                    if isinstance(genotype, s.genotype_type))
    raise ValueError(f'--search_workdir={config.search_workdir} searched the {searched} space, '
                     f'not --space={config.space}: pass --space={searched}')
  return genotype


def describe_arch(config: TrainConfig) -> str:
  source = arch_source(config)
  return f'--{source}={getattr(config, source)}'


def build_model(genotype: genotypes.Genotype, config: TrainConfig, *, auxiliary: bool | None = None):
  """The reference child network for ``config.dataset`` (a backend binds it to run it).

  Reads config.dataset, channels, layers, auxiliary_weight, remat
  (a TrainConfig or the steps' cache key, which has the same fields).
  """
  if auxiliary is None:
    auxiliary = config.auxiliary_weight > 0
  options = dict(auxiliary=auxiliary, remat=config.remat, dtype=jnp.dtype(config.dtype))
  if config.dataset == 'imagenet':
    return child_model.NetworkImageNet(genotype, config.channels, config.layers,
                                       NUM_CLASSES[config.dataset], **options)
  return spaces.get(config.space).child_network(genotype, config.channels, config.layers,
                                                NUM_CLASSES[config.dataset], **options)


def image_size(config: TrainConfig) -> int:
  return config.image_size if config.dataset == 'imagenet' else CIFAR_IMAGE_SIZE


# ----------------------------------------------------------------------------
# Model size.


def count_params(params) -> int:
  """Trainable parameters (BN scale/offset included, running statistics not), auxiliary head
  excluded, as the papers count."""
  params = flax.core.unfreeze(params)
  return sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(params)
             if not any(getattr(k, 'key', None) == child_model.AUX_SCOPE for k in path))


def abstract_variables(model, config: TrainConfig, batch: int = 2):
  """ShapeDtypeStructs of the model's variables (jax.eval_shape: no compute, no memory)."""
  size = image_size(config)
  rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}
  return jax.eval_shape(lambda: model.init(rngs, jnp.zeros((batch, size, size, 3)), jnp.float32(0),
                                           train=True))


def count_multiply_adds(genotype: genotypes.Genotype, config: TrainConfig) -> int:
  """Multiply-adds of one image's inference forward pass (auxiliary head excluded).

  Counted from the traced program, not a formula: the forward's jaxpr (XLA
  convolutions of the reference model) is walked and every convolution adds
  output size x kernel taps x input channels per group, every dot (1x1 convs,
  the classifier) output size x contracted size. Pools, BN, ReLU and sums are
  not multiply-adds, as in the mobile-setting convention (NASNet, DARTS).
  """
  model = build_model(genotype, config, auxiliary=False)
  variables = abstract_variables(model, config)
  size = image_size(config)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, jnp.float32(0), train=False))(
      variables, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return _jaxpr_multiply_adds(jaxpr.jaxpr)


def _jaxpr_multiply_adds(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, *spatial)
      taps = int(np.prod([rhs[d] for d in rhs_spec[2:]]))
      total += int(np.prod(eqn.outvars[0].aval.shape)) * taps * rhs[rhs_spec[1]]
    elif eqn.primitive.name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      contracted = int(np.prod([lhs[d] for d in lhs_contract]))
      total += int(np.prod(eqn.outvars[0].aval.shape)) * contracted
    for value in eqn.params.values():  # pjit, custom_jvp/vjp, remat bodies
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          total += _jaxpr_multiply_adds(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          total += _jaxpr_multiply_adds(sub)
  return total


def summarize(config: TrainConfig, genotype: genotypes.Genotype | None = None) -> dict:
  """{'params', 'multiply_adds', 'params_M', 'multiply_adds_M', ...} of the configured child."""
  genotype = genotype or resolve_genotype(config)
  model = build_model(genotype, config, auxiliary=False)
  params = count_params(abstract_variables(model, config)['params'])
  madds = count_multiply_adds(genotype, config)
  return {'arch': describe_arch(config), 'dataset': config.dataset, 'channels': config.channels,
          'layers': config.layers, 'image_size': image_size(config), 'params': params,
          'multiply_adds': madds, 'params_M': round(params / 1e6, 3),
          'multiply_adds_M': round(madds / 1e6, 1)}


def format_summary(s: dict) -> str:
  """One line: '<arch> on <dataset> (C, L, size): params P.PPM (n), multiply-adds M.MM (n) ...'."""
  line = (f'{s["arch"]} on {s["dataset"]} (C={s["channels"]}, L={s["layers"]}, '
          f'{s["image_size"]}x{s["image_size"]}): params {s["params"] / 1e6:.2f}M ({s["params"]}, '
          f'auxiliary head excluded), multiply-adds {s["multiply_adds"] / 1e6:.1f}M '
          f'({s["multiply_adds"]}) per image')
  if s['dataset'] == 'imagenet' and s['multiply_adds'] > MOBILE_MULTIPLY_ADDS:
    line += f' (above the mobile setting\'s {MOBILE_MULTIPLY_ADDS / 1e6:.0f}M)'
  return line


def check_mobile_setting(config: TrainConfig, multiply_adds: int) -> None:
  if (config.dataset == 'imagenet' and not config.allow_large
      and multiply_adds > MOBILE_MULTIPLY_ADDS):
    raise ValueError(f'this network needs {multiply_adds / 1e6:.0f}M multiply-adds per image, '
                     f'above the mobile setting\'s {MOBILE_MULTIPLY_ADDS / 1e6:.0f}M; lower '
                     f'--channels or --layers, or pass --allow_large')


# ----------------------------------------------------------------------------
# Input.


class DataSource(NamedTuple):
  """Host-side batches of this process: {'image', 'label', 'mask'}."""
  train: Callable[[int, int], Iterable[dict]]  # (epoch, start_step) -> batches start_step..
  evaluate: Callable[[], Iterable[dict]]
  steps_per_epoch: int
  num_train: int
  num_eval: int


def cifar_iterators(config: TrainConfig, arrays: dict):
  """(train, test) data.BatchIterators over ``load_cifar``'s arrays; cutout on train only."""
  train_images, train_labels = data.subset(arrays['train_images'], arrays['train_labels'],
                                           config.num_train_images, seed=config.seed)
  test_images, test_labels = data.subset(arrays['test_images'], arrays['test_labels'],
                                         config.num_eval_images, seed=0)
  procs = dict(process_index=jax.process_index(), process_count=jax.process_count(),
               dataset=config.dataset)
  train_it = data.BatchIterator(train_images, train_labels, config.batch_size, seed=config.seed,
                                train=True, cutout=config.cutout, **procs)
  test_it = data.BatchIterator(test_images, test_labels, config.batch_size, seed=config.seed,
                               train=False, **procs)
  return train_it, test_it


def make_data(config: TrainConfig) -> DataSource:
  if config.dataset != 'imagenet':
    arrays = data.load_cifar(config.data_dir, config.tfds_data_dir or None,
                             log=print if jax.process_index() == 0 else None,
                             dataset=config.dataset)
    train_it, test_it = cifar_iterators(config, arrays)
    return DataSource(train_it.epoch, lambda: test_it.epoch(0), train_it.steps_per_epoch,
                      len(train_it.labels), len(test_it.labels))
  train_factory, eval_factory, num_train, num_eval = data.imagenet_datasets(
      config.tfds_data_dir or None, config.batch_size, seed=config.seed,
      image_size=config.image_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  if config.num_train_images:
    num_train = min(num_train, config.num_train_images)
  steps = num_train // config.batch_size
  if steps == 0:
    raise ValueError(f'--batch_size={config.batch_size} exceeds the {num_train} training images')
  eval_batches = None
  if config.num_eval_images and config.num_eval_images < num_eval:
    num_eval = config.num_eval_images
    eval_batches = -(-num_eval // config.batch_size)
  train = lambda epoch, start: itertools.islice(train_factory(epoch, start), max(steps - start, 0))
  evaluate = lambda: itertools.islice(eval_factory(0), eval_batches)
  return DataSource(train, evaluate, steps, steps * config.batch_size, num_eval)


# ----------------------------------------------------------------------------
# Model & Optimizer.


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates done
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] base key; step t uses fold_in(rng, t)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """Clip -> + wd·w -> SGD with momentum, as PyTorch's clip_grad_norm +
  SGD(weight_decay) do; the rate a per-epoch schedule of the update count.

  Reads config.grad_clip, weight_decay, momentum and the schedule's fields
  (a TrainConfig or the steps' cache key, which has the same fields).
  """
  schedule = loop.per_epoch(learning_rate_schedule(config), steps_per_epoch, config.epochs)
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum))


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example CE against (1 - ε)·one_hot + ε/K targets. logits [N,K], labels [N] -> [N]."""
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def training_loss(logits, aux_logits, labels, *, aux_weight: float, smoothing: float):
  """(total, main CE, aux CE) = (CE + aux_weight · aux CE, CE, aux CE), batch means.

  The auxiliary head's CE uses the same label smoothing (as the reference).
  """
  main = cross_entropy(logits, labels, smoothing).mean()
  if aux_logits is None:
    return main, main, jnp.zeros_like(main)
  aux = cross_entropy(aux_logits, labels, smoothing).mean()
  return main + aux_weight * aux, main, aux


# ----------------------------------------------------------------------------
# Update steps.


class Steps(NamedTuple):
  init: Callable  # (seed: int) -> TrainState, replicated (host-side, not for jit)
  abstract_state: Callable  # () -> ShapeDtypeStructs of a TrainState (for restoring)
  train: Callable  # (state, batch, drop_rate) -> (state, metrics); state donated
  evaluate: Callable  # (state, batch) -> sums {'loss', 'correct', 'correct_top5', 'count'}


@dataclasses.dataclass(frozen=True)
class _StepSpec:
  """Everything the compiled steps depend on (lru_cache key: equal specs share compiles)."""
  genotype: genotypes.Genotype
  space: str
  dataset: str
  channels: int
  layers: int
  image_size: int
  auxiliary_weight: float
  label_smoothing: float
  remat: bool
  backend: str
  dtype: str
  init: str
  grad_clip: float
  weight_decay: float
  momentum: float
  learning_rate: float
  lr_schedule: str
  lr_min: float
  lr_decay: float
  epochs: int
  steps_per_epoch: int


def make_steps(config: TrainConfig, genotype: genotypes.Genotype, mesh,
               steps_per_epoch: int) -> Steps:
  spec = _StepSpec(genotype, config.space, config.dataset, config.channels, config.layers, image_size(config),
                   config.auxiliary_weight, config.label_smoothing, config.remat,
                   backends.resolve(config.backend, dtype=config.dtype), config.dtype, config.init,
                   config.grad_clip, config.weight_decay, config.momentum, config.learning_rate,
                   config.lr_schedule, config.lr_min, config.lr_decay, config.epochs,
                   steps_per_epoch)
  return _make_steps(spec, mesh)


@functools.lru_cache(maxsize=8)
def _make_steps(spec: _StepSpec, mesh) -> Steps:
  network = build_model(spec.genotype, spec)
  backend = backends.get(spec.backend)
  model = backend.bind(network)
  tx = make_optimizer(spec, spec.steps_per_epoch)
  size = spec.image_size

  rep = parallel.replicated(mesh)
  init_images = jnp.zeros((2, size, size, 3))

  def init_variables(key):
    return network.init({'params': key, 'dropout': key}, init_images, jnp.float32(0), train=True)

  def state_from_variables(variables, seed):
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables['batch_stats'], opt_state=tx.init(params),
                      rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))

  assemble = jax.jit(state_from_variables, out_shardings=rep)

  def init(seed):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 2)
    variables = backend.init_variables(network, {'params': key, 'dropout': key}, init_images,
                                       jnp.float32(0), train=True)
    variables = {**variables, 'params': reinitialize(variables['params'], spec.init, seed)}
    return assemble(jax.device_put(variables, rep), jnp.int32(seed))

  def abstract_state():
    variables = jax.eval_shape(init_variables, jax.random.PRNGKey(0))
    return jax.eval_shape(state_from_variables, variables, jnp.int32(0))

  def train_step(state: TrainState, batch: dict, drop_rate):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      (logits, aux_logits), updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch['image'], drop_rate,
          train=True, rngs={'dropout': rng}, mutable=['batch_stats'])
      loss, main, aux = training_loss(logits, aux_logits, batch['label'],
                                      aux_weight=spec.auxiliary_weight,
                                      smoothing=spec.label_smoothing)
      return loss, (logits, main, aux, updates['batch_stats'])

    (loss, (logits, main, aux, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'ce': main, 'aux_ce': aux, 'grad_norm': optax.global_norm(grads),
               'acc': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
               # Whether what this step commits is finite: a state without it is never saved.
               'finite': loop.all_finite(loss, params, opt_state, batch_stats)}
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  def eval_step(state: TrainState, batch: dict):
    logits, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                            batch['image'], jnp.float32(0), train=False)
    mask = batch['mask'].astype(jnp.float32)
    labels = batch['label']
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {'loss': jnp.sum(cross_entropy(logits, labels) * mask),
            'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            'correct_top5': jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask),
            'count': jnp.sum(mask)}

  rows = parallel.batch_sharded(mesh)
  return Steps(
      init=init, abstract_state=abstract_state,
      train=jax.jit(train_step, in_shardings=(rep, rows, rep), out_shardings=(rep, rep),
                    donate_argnums=0),
      evaluate=jax.jit(eval_step, in_shardings=(rep, rows), out_shardings=rep))


def evaluate(steps: Steps, state: TrainState, source: DataSource, mesh, stops=None) -> dict:
  """{'eval_loss', 'eval_acc', 'eval_top5', 'eval_count'} over the (whole) eval set.
  Raises loop.EvalStopped once ``stops`` has a request."""
  sums = loop.eval_sums(lambda i, batch: steps.evaluate(state, parallel.to_global(batch, mesh)),
                           source.evaluate(), stops)
  sums = {k: sums.get(k, 0.0) for k in ('loss', 'correct', 'correct_top5', 'count')}
  count = max(sums['count'], 1.0)
  return {'eval_loss': sums['loss'] / count, 'eval_acc': sums['correct'] / count,
          'eval_top5': sums['correct_top5'] / count, 'eval_count': int(sums['count'])}


# ----------------------------------------------------------------------------
# Checkpoint.

# Learning rates a resumed run may change (e.g. after a NaN); each change is
# recorded in the checkpoint's metadata.
LR_FIELDS = frozenset({'learning_rate', 'lr_min', 'lr_decay'})
# Fields a resumed run may change: the learning rates, where data lives, how
# often to save, display, the backend (same variables, same
# function), and how the genotype was given (the genotype itself is compared).
RESUMABLE_FIELDS = LR_FIELDS | {'search_workdir', 'derive_rule', 'genotype_json', 'arch',
                                'data_dir', 'tfds_data_dir', 'checkpoint_every_steps',
                                'stop_after_step', 'allow_large', 'progress', 'backend', 'remat'}


def check_resumable(meta: dict, config: TrainConfig, genotype: genotypes.Genotype,
                    workdir: str) -> None:
  """One-line CheckpointError if ``meta`` was written by a run with another configuration."""
  loop.check_resume_config(
      meta.get('config', {}), config_lib.to_dict(config), RESUMABLE_FIELDS, workdir,
      'training run',
      extra_diffs=['another genotype'] if meta.get('genotype') != genotype.to_dict() else [])


# ----------------------------------------------------------------------------
# Task.


class TrainTask(loop.Task):
  """The retraining as loop.run runs it: one step per batch, the test set
  evaluated after each epoch, ``final.json`` at the end."""

  name = 'training run'
  lr_fields = LR_FIELDS
  lr_flags = '--learning_rate'
  eval_losses = {'eval_loss': 'test loss'}

  def __init__(self, config: TrainConfig):
    """Every cheap check (genotype, size limit, data) comes here, before any compile."""
    self.train_config = config
    self.genotype = resolve_genotype(config)
    self.mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, self.mesh)
    self.summary = summarize(config, self.genotype)
    check_mobile_setting(config, self.summary['multiply_adds'])
    self.source = make_data(config)
    self.config = config_lib.to_dict(config)
    self.epochs, self.steps_per_epoch = config.epochs, self.source.steps_per_epoch
    self.checkpoint_every_steps = config.checkpoint_every_steps
    self.stop_after_step, self.progress = config.stop_after_step, config.progress
    self._steps = None

  @property
  def steps(self) -> Steps:
    if self._steps is None:
      self._steps = make_steps(self.train_config, self.genotype, self.mesh, self.steps_per_epoch)
    return self._steps

  def abstract_state(self):
    return checkpoint.abstract_like(self.steps.abstract_state(), parallel.replicated(self.mesh))

  def init_state(self):
    return self.steps.init(self.train_config.seed)

  def meta_fields(self):
    return {'genotype': self.genotype.to_dict()}

  def check_meta(self, meta, workdir):
    check_resumable(meta, self.train_config, self.genotype, workdir)

  def epoch_inputs(self, epoch):
    rate = np.float32(drop_path_rate(self.train_config, epoch))
    return (parallel.put_replicated(rate, self.mesh),)

  def batches(self, epoch, start):
    return (parallel.to_global(b, self.mesh) for b in self.source.train(epoch, start))

  def train_step(self, state, batch, drop_rate):
    return self.steps.train(state, batch, drop_rate)

  def evaluate(self, state, epoch, stops):
    return evaluate(self.steps, state, self.source, self.mesh, stops)

  def record(self, epoch, train, evals, epoch_time, steps_run):
    config = self.train_config
    return {**{f'train_{k}': v for k, v in train.items()}, **evals,
            'lr': learning_rate(config, epoch), 'drop_path_rate': drop_path_rate(config, epoch),
            'epoch_time_s': epoch_time,
            'train_images_per_s': steps_run * config.batch_size / epoch_time}

  def epoch_line(self, epoch, record):
    return (f'epoch {epoch + 1}/{self.epochs}: train loss {record["train_loss"]:.4f} '
            f'acc {record["train_acc"]:.4f}, test loss {record["eval_loss"]:.4f} '
            f'acc {record["eval_acc"]:.4f} ({record["epoch_time_s"]:.0f} s)')

  def outputs(self):
    return [FINAL_FILE]

  def final(self, meta: dict) -> dict:
    """final.json: the test error of the last epoch's evaluation, the sizes, the time."""
    config, last = self.train_config, meta['records'][-1]
    return {'dataset': config.dataset, 'arch': describe_arch(config),
            'genotype': self.genotype.to_dict(), 'epochs': config.epochs,
            'test_error': round(100 * (1 - last['eval_acc']), 4),
            'test_top5_error': round(100 * (1 - last['eval_top5']), 4),
            'test_loss': last['eval_loss'], 'eval_images': last['eval_count'],
            'params_M': self.summary['params_M'],
            'multiply_adds_M': self.summary['multiply_adds_M'],
            'elapsed_s': round(meta['elapsed_s'], 1)}

  def write_outputs(self, workdir, state, meta):
    loop.write_json(os.path.join(workdir, FINAL_FILE), self.final(meta))

  def final_line(self, workdir, meta):
    final = self.final(meta)
    return (f'test error {final["test_error"]:.2f}% on {final["eval_images"]} images; '
            f'{os.path.join(workdir, FINAL_FILE)}')


def train_and_evaluate(config: TrainConfig, workdir: str) -> dict:
  """Trains the configured child from scratch (or resumes), evaluates each epoch.

  Returns the contents of ``<workdir>/final.json`` ({'stopped_at_step': s}
  instead when --stop_after_step ends the run early); loop.run: the stops
  and errors.
  """
  config_lib.validate(config)
  loop.check_workdir(workdir)
  task = TrainTask(config)
  if jax.process_index() == 0:
    print(format_summary(task.summary), flush=True)
  result = loop.run(task, workdir)
  if result.stopped_at is not None:
    return {'stopped_at_step': result.stopped_at}
  return task.final(result.meta)


# ----------------------------------------------------------------------------
# Summary (experiments/train_*.py --summary).


def print_summary(config: TrainConfig) -> dict:
  """Prints the one-line size summary (no workdir, no training) and returns it."""
  config_lib.validate(config)
  summary = summarize(config)
  print(format_summary(summary), flush=True)
  return summary
