"""SNAS search: the configuration, the jitted step, evaluation and its task.

Read top to bottom: Config, Model & Optimizer, Update Step, Evals, Checkpoint,
Task (what loop.run runs; the hand-off in its finish). One pure step updates
w and α from the same backward pass on the same batch (single-level,
docs/algorithm.md §3): a Gumbel-softmax sample Z per cell type (one per
step, shared by the batch and all cells of that type),
cross-entropy plus η·resource penalty, one optax transformation partitioned
into SGD for w and Adam for α.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from snas_jax import checkpoint, config as config_lib, costs, data, parallel
from snas_jax import backends, benchmark, loop, methods, reporting, sampling, spaces
from snas_jax.config import BACKEND_HELP, field

# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  # Data.
  data_dir: str = field(data.AUTO, data.DATA_DIR_HELP)
  tfds_data_dir: str = field('', 'tensorflow-datasets data dir for cifar10 when it is read '
                             'through tfds; empty: the tfds default.')
  dataset: str = field('cifar10', 'Data set to search on: cifar10 or cifar100 (tensorflow-'
                       'datasets; 100 classes).', choices=tuple(data.CIFAR_STATS))
  num_train_images: int = field(0, 'Search on this many training images (class-balanced '
                                'subset); 0 = all 50,000 (or all but the held-out ones).')
  heldout_images: int = field(0, 'Hold out this many training images for search validation; '
                              '0 = validate on the test set, as the reference does.')
  num_eval_images: int = field(0, 'Validate on this many images each epoch; 0 = all.')
  num_test_images: int = field(0, 'Test the final derived child on this many test images; 0 = all.')
  image_size: int = field(32, 'Search on images area-downsampled to this side (a proxy task: '
                          '16 makes a CPU search 4x cheaper); 32 = CIFAR as it is.')
  # Network.
  space: str = field(spaces.DEFAULT, 'Search space (docs/spaces.md): darts (the DARTS cell, a '
                     'normal and a reduction cell) or nb201 (NAS-Bench-201\'s cell).',
                     choices=tuple(spaces.SPACES))
  channels: int = field(16, 'Initial channels C of the search network.')
  layers: int = field(8, 'Depth of the search network: darts, its cells (reductions at L//3 '
                      'and 2L//3); nb201, its cells per stage (N).')
  drop_path: float = field(0.0, 'Per-sample drop probability of each edge during search. The '
                           'reference uses 0.3; the paper does not mention it.')
  backend: str = field('auto', BACKEND_HELP, choices=backends.NAMES)
  dtype: str = field('float32', backends.DTYPE_HELP, choices=backends.DTYPES)
  remat: bool = field(False, 'Recompute more in the backward pass (the reference\'s --use_ckpt): '
                      'less memory, slower. Each cell on the reference backend; on the CPU '
                      'backend the convolutions recompute their outputs before BN.')
  # Method.
  method: str = field('snas', '; '.join(f'{m.name}: {m.help}' for m in methods.METHODS.values())
                      + ' (docs/algorithm.md §2).', choices=methods.NAMES)
  tau0: float = field(0.0, 'Initial Gumbel-softmax temperature; 0 = the method\'s (snas 1, '
                      'gdas 10; darts uses none).')
  tau_min: float = field(0.0, 'Final temperature, reached at the last epoch (linear per epoch); '
                         '0 = the method\'s (snas 0.03, gdas 0.1).')
  resource_eta: float = field(0.0, 'Weight η of the resource penalty; 0 = no constraint. See '
                              'README for the mild / moderate / aggressive levels.')
  resource_estimator: str = field('score', 'Gradient of the penalty: score (eq. 11, per-edge '
                                  'credit), pathwise (through the soft sample), exact (expectation).',
                                  choices=costs.ESTIMATORS)
  resource_kinds: str = field('params,flops,mac', 'Comma-separated costs in the penalty.')
  resource_transform: str = field('log', 'Each cost enters as its log (clamped at 1) or as is.',
                                  choices=('log', 'linear'))
  # Optimisation (docs/algorithm.md §5).
  batch_size: int = field(64, 'Global batch size (split over all devices of all hosts).')
  epochs: int = field(150, 'Search epochs; τ and the w learning rate follow this count.')
  w_lr: float = field(0.025, 'SGD learning rate of the weights w (cosine-annealed per epoch).')
  w_lr_min: float = field(0.001, 'Final learning rate of w.')
  w_momentum: float = field(0.9, 'SGD momentum of w.')
  w_weight_decay: float = field(3e-4, 'L2 weight decay of w.')
  grad_clip: float = field(5.0, 'Global-norm clip of the w gradient.')
  alpha_lr: float = field(3e-4, 'Adam learning rate of α.')
  alpha_beta1: float = field(0.5, 'Adam β1 of α.')
  alpha_beta2: float = field(0.999, 'Adam β2 of α.')
  alpha_weight_decay: float = field(1e-3, 'L2 weight decay of α (added to the gradient, as torch Adam).')
  benchmark_dir: str = field('', benchmark.BENCHMARK_DIR_HELP + ' nb201 only: the derived '
                             'cell\'s benchmark record joins each epoch\'s metrics and the summary.')
  seed: int = field(0, 'Seed of initialisation, data order, augmentation and Gumbel noise.')
  # Bookkeeping.
  eval_batch_size: int = field(256, 'Global batch size of evaluation.')
  checkpoint_every_steps: int = field(500, 'Also checkpoint every this many steps (and at each epoch end).')
  stop_after_step: int = field(0, 'Checkpoint and stop once this global step is done, as if '
                               'preempted (0 = run to the end). For testing resume.')

  def __post_init__(self):
    # 0 means the method's own schedule: the stored configuration holds the τ used.
    schedule = methods.METHODS[self.method].tau_schedule if self.method in methods.METHODS else None
    if schedule:
      for name, default in zip(TAU_FIELDS, schedule):
        if getattr(self, name) == 0:
          object.__setattr__(self, name, default)

  def check(self):
    method = methods.get(self.method)
    config_lib.positive(self, 'image_size', 'channels', 'layers', 'batch_size', 'epochs', 'eval_batch_size',
                        'w_lr', 'alpha_lr', 'checkpoint_every_steps',
                        *(TAU_FIELDS if method.tau_schedule else ()))
    space = spaces.get(self.space)
    space.check_network(self.layers, self.image_size)
    if not 0 <= self.drop_path < 1:
      raise ValueError(f'--drop_path={self.drop_path} must lie in [0, 1)')
    make_network(self)  # the space refuses options its network lacks
    if self.resource_eta < 0:
      raise ValueError(f'--resource_eta={self.resource_eta} must be >= 0')
    if self.tau_min > self.tau0:
      raise ValueError(f'--tau_min={self.tau_min} must not exceed --tau0={self.tau0}')
    if not method.discrete and self.resource_eta > 0 and self.resource_estimator == 'score':
      raise ValueError(f'--method={self.method} has no discrete sample: use --resource_estimator=exact '
                       'or pathwise with --resource_eta')
    self.kinds()

  def kinds(self) -> tuple:
    kinds = tuple(k.strip() for k in self.resource_kinds.split(',') if k.strip())
    if not kinds or set(kinds) - set(costs.COST_KINDS):
      raise ValueError(f'--resource_kinds={self.resource_kinds!r}: use a comma-separated subset '
                       f'of {",".join(costs.COST_KINDS)}')
    return kinds


# Learning rates a resumed run may change (e.g. after a NaN); each change is
# recorded in the checkpoint's metadata.
LR_FIELDS = frozenset({'w_lr', 'w_lr_min', 'alpha_lr'})
# Fields a resumed run may change: the learning rates, and those that alter
# neither shapes nor results.
RESUMABLE_FIELDS = LR_FIELDS | {'data_dir', 'tfds_data_dir', 'backend', 'remat', 'eval_batch_size',
                                'checkpoint_every_steps', 'stop_after_step', 'benchmark_dir'}
# Fields a checkpoint written before they existed lacks, with the value it ran with.
ADDED_FIELDS = {'space': 'darts'}
# The temperature schedule's ends; they change nothing for a method without τ.
TAU_FIELDS = ('tau0', 'tau_min')

# ----------------------------------------------------------------------------
# Model & Optimizer
# ----------------------------------------------------------------------------


@struct.dataclass
class SearchState:
  step: jax.Array        # int32 scalar: global steps done
  params: dict           # {'w': network weights, 'alpha': {cell type: [edges, ops]}}
  batch_stats: dict      # BatchNorm running statistics
  opt_state: optax.OptState
  rng: jax.Array         # uint32[2]; step t uses fold_in(rng, t)


NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}


def make_network(cfg: SearchConfig):
  """The reference search network of ``cfg``'s space (a backend binds it to run it)."""
  return spaces.get(cfg.space).search_network(
      cfg.channels, cfg.layers, NUM_CLASSES[cfg.dataset], drop_path=cfg.drop_path,
      remat=cfg.remat, dtype=jnp.dtype(cfg.dtype))


def learning_rate_schedule(cfg: SearchConfig, steps_per_epoch: int):
  """Update count -> w's rate: cosine from w_lr to w_lr_min, stepped per epoch
  (PyTorch CosineAnnealingLR)."""
  return loop.per_epoch(loop.cosine_per_epoch(cfg.w_lr, cfg.w_lr_min, cfg.epochs),
                        steps_per_epoch, cfg.epochs)


def make_optimizer(cfg: SearchConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD for w (its rate a schedule of the update count), Adam for α, as one
  partitioned transformation. Through inject_hyperparams, the step compiles
  as it did for the published results (README, docs/replication.md): a
  plain optax.sgd(schedule) rounds otherwise (α moved by 6e-8 in 8 steps of
  the tests' tiny search)."""
  w_tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.add_decayed_weights(cfg.w_weight_decay),
                     optax.inject_hyperparams(optax.sgd)(
                         learning_rate=learning_rate_schedule(cfg, steps_per_epoch),
                         momentum=cfg.w_momentum))
  alpha_tx = optax.chain(optax.add_decayed_weights(cfg.alpha_weight_decay),
                         optax.adam(cfg.alpha_lr, b1=cfg.alpha_beta1, b2=cfg.alpha_beta2))
  labels = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}
  return optax.partition({'w': w_tx, 'alpha': alpha_tx}, labels)


def _init_args(space, image_shape) -> tuple:
  """Example inputs of the network's init: one image, uniform Z, eval mode."""
  z = jnp.full(space.arch_shape, 1.0 / space.num_ops)
  return jnp.zeros((1,) + tuple(image_shape)), {t: z for t in space.cell_types}, False


def _network_variables(cfg: SearchConfig, net, image_shape, key) -> dict:
  return net.init(key, *_init_args(spaces.get(cfg.space), image_shape))


def init_variables(cfg: SearchConfig, net, image_shape,
                   backend: backends.Backend | None = None) -> dict:
  """The network's parameters and BN statistics in the reference layout, drawn
  as ``backend`` draws them (default: the reference's); not for jit."""
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
  backend = backend or backends.get('reference')
  return backend.init_variables(net, key, *_init_args(spaces.get(cfg.space), image_shape))


def state_from_variables(cfg: SearchConfig, tx, variables: dict) -> SearchState:
  """The initial state around the network's variables (pure; jit it). α ~
  N(1, 0.01) as the reference (the mean cancels in the softmax), one per cell type."""
  space = spaces.get(cfg.space)
  *k_alpha, k_run = jax.random.split(jax.random.PRNGKey(cfg.seed), len(space.cell_types) + 1)
  params = {'w': variables['params'],
            'alpha': {t: 1.0 + 1e-2 * jax.random.normal(k, space.arch_shape)
                      for t, k in zip(space.cell_types, k_alpha)}}
  return SearchState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables['batch_stats'], opt_state=tx.init(params), rng=k_run)


def init_state(cfg: SearchConfig, net, tx, image_shape,
               sharding=None, backend: backends.Backend | None = None) -> SearchState:
  """The initial state, placed with ``sharding`` (default: the default device)."""
  variables = jax.device_put(init_variables(cfg, net, image_shape, backend), sharding)
  place = {} if sharding is None else {'out_shardings': sharding}
  return jax.jit(functools.partial(state_from_variables, cfg, tx), **place)(variables)


def abstract_state(cfg: SearchConfig, net, tx, image_shape) -> SearchState:
  """ShapeDtypeStructs of ``init_state`` (for restoring a checkpoint), no compute."""
  variables = jax.eval_shape(
      functools.partial(_network_variables, cfg, net, image_shape), jax.random.PRNGKey(0))
  return jax.eval_shape(functools.partial(state_from_variables, cfg, tx), variables)

# ----------------------------------------------------------------------------
# Update Step
# ----------------------------------------------------------------------------


def arch_weights(cfg: SearchConfig, alpha: dict, key, tau):
  """Edge weights the network runs with, drawn by the method: {cell type:
  (Z, the one-hot sample behind it or None)}."""
  draw = methods.get(cfg.method).draw
  return {cell_type: draw(jax.random.fold_in(key, i), alpha[cell_type], tau)
          for i, cell_type in enumerate(spaces.get(cfg.space).cell_types)}


def train_step_fn(cfg: SearchConfig, net, tx, penalty_tables: dict):
  """The pure step: (state, batch, tau) -> (state, metrics). metrics['finite']:
  whether the loss and the whole updated state are finite (the loop never
  saves a state without it)."""
  tables = {k: jnp.asarray(v) for k, v in penalty_tables.items()}

  def train_step(state: SearchState, batch: dict, tau):
    key = jax.random.fold_in(state.rng, state.step)
    k_arch, k_drop = jax.random.split(key)

    def loss_fn(params):
      z = arch_weights(cfg, params['alpha'], k_arch, tau)
      logits, new_vars = net.apply(
          {'params': params['w'], 'batch_stats': state.batch_stats}, batch['image'],
          {t: zt[0] for t, zt in z.items()}, True, mutable=['batch_stats'],
          rngs={'dropout': k_drop})
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
      penalty = jnp.zeros(())
      if cfg.resource_eta > 0:
        penalty = cfg.resource_eta * sum(
            costs.resource_penalty(params['alpha'][t], z[t][0], z[t][1], tables[t],
                                   cfg.resource_estimator) for t in z)
      return ce + penalty, (ce, logits, new_vars['batch_stats'])

    grads, (ce, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': ce,
               'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
               'grad_norm_w': optax.global_norm(grads['w']),
               'finite': loop.all_finite(ce, params, opt_state, batch_stats)}
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  return train_step


def make_train_step(cfg: SearchConfig, net, tx, penalty_tables: dict, mesh):
  """The step jitted over the mesh: state replicated, batch split over 'data'
  (jit inserts the gradient all-reduce; BN sees the global batch), state donated."""
  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(train_step_fn(cfg, net, tx, penalty_tables), in_shardings=(repl, sharded, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))

# ----------------------------------------------------------------------------
# Evals
# ----------------------------------------------------------------------------


def make_eval_step(net, mesh):
  """(state, batch, z {cell type: Z}) -> summed loss / correct / count, BN in eval mode."""
  def eval_step(state: SearchState, batch: dict, z):
    logits = net.apply({'params': state.params['w'], 'batch_stats': state.batch_stats},
                       batch['image'], z, False)
    mask = batch['mask'].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return {'loss': (ce * mask).sum(), 'correct': ((jnp.argmax(logits, -1) == batch['label']) * mask).sum(),
            'count': mask.sum()}
  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(eval_step, in_shardings=(repl, sharded, repl), out_shardings=repl)


def evaluate(eval_step, state, iterator, mesh, z_fn, stops=None) -> dict:
  """Accuracy and loss over one pass; ``z_fn(batch_index)`` -> {cell type: Z}.
  Raises loop.EvalStopped once ``stops`` has a request."""
  sums = loop.eval_sums(
      lambda i, batch: eval_step(state, parallel.to_global(batch, mesh), z_fn(i)),
      iterator.epoch(0), stops)
  count = max(sums.get('count', 0.0), 1)
  return {'accuracy': sums.get('correct', 0.0) / count, 'loss': sums.get('loss', 0.0) / count}


def derive_genotypes(alpha: dict, space: str = spaces.DEFAULT) -> dict:
  """Every derivation rule of ``space`` on the current α: {rule: genotype}."""
  space = spaces.get(space)
  alpha = {t: np.asarray(a) for t, a in alpha.items()}
  return {rule: space.derive(alpha, rule) for rule in space.derive_rules}


def child_genotype(cfg: SearchConfig, alpha: dict):
  """The derived child: the method's own derivation rule."""
  return spaces.get(cfg.space).derive({t: np.asarray(a) for t, a in alpha.items()},
                                      methods.get(cfg.method).derivation)


def child_arch_weights(cfg: SearchConfig, alpha: dict) -> dict:
  """One-hot Z {cell type: [edges, ops]} of the derived child."""
  one_hot = spaces.get(cfg.space).one_hot(child_genotype(cfg, alpha))
  return {t: jnp.asarray(z) for t, z in one_hot.items()}


def arch_summary(cfg: SearchConfig, alpha: dict, child_z, image_size: int) -> dict:
  """α entropy per edge and the expected / derived-child cell costs (child_z:
  the child's one-hot Z, from child_arch_weights)."""
  space = spaces.get(cfg.space)
  out = {}
  for cell_type in space.cell_types:
    ent = np.asarray(sampling.entropy(alpha[cell_type]))
    out[f'alpha_entropy_{cell_type}'] = float(ent.mean())
    out[f'alpha_entropy_{cell_type}_per_edge'] = [round(float(e), 5) for e in ent]
  probs = {t: jax.nn.softmax(alpha[t], axis=-1) for t in space.cell_types}
  for prefix, z in (('expected', probs), ('child', child_z)):
    for kind, value in costs.network_costs(z, cfg.channels, cfg.layers, image_size,
                                           space).items():
      out[f'{prefix}_{kind}'] = float(value)
  return out

# ----------------------------------------------------------------------------
# Checkpoint
# ----------------------------------------------------------------------------


def check_resume_config(saved: dict, cfg: SearchConfig, workdir: str) -> None:
  """A resume must not change anything that alters shapes or results, but
  the learning rates (LR_FIELDS)."""
  unused = () if methods.get(cfg.method).tau_schedule else TAU_FIELDS
  loop.check_resume_config({**ADDED_FIELDS, **saved}, config_lib.to_dict(cfg),
                           RESUMABLE_FIELDS | set(unused), workdir, 'search')


def load_genotype(search_workdir: str, rule: str = 'snas'):
  """The genotype of a finished search, restored through its Orbax checkpoint."""
  if not os.path.isdir(os.path.join(search_workdir, checkpoint.CHECKPOINT_DIR)):
    raise checkpoint.CheckpointError(
        f'--search_workdir={search_workdir} holds no search checkpoint; run '
        f'experiments/search_cifar.py with --workdir={search_workdir} first')
  meta = checkpoint.Checkpointer(search_workdir, read_only=True).restore_meta()
  if not meta.get('finished'):
    raise checkpoint.CheckpointError(
        f'--search_workdir={search_workdir} holds an unfinished search (epoch {meta["epoch"]} '
        f'of {meta["config"]["epochs"]}); rerun its command to finish it')
  if rule not in meta['genotypes']:
    raise ValueError(f'unknown derivation rule {rule!r}; use one of {sorted(meta["genotypes"])}')
  space = spaces.get(meta['config'].get('space', ADDED_FIELDS['space']))
  return space.genotype_type.from_dict(meta['genotypes'][rule])

# ----------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------


def load_data(cfg: SearchConfig) -> dict:
  """Train / validation / test arrays; fails (one line) before anything compiles."""
  cifar = data.load_cifar(cfg.data_dir, cfg.tfds_data_dir or None,
                          log=print if jax.process_index() == 0 else None, dataset=cfg.dataset)
  train = (data.downsample(cifar['train_images'], cfg.image_size), cifar['train_labels'])
  test = (data.downsample(cifar['test_images'], cfg.image_size), cifar['test_labels'])
  val = test
  if cfg.heldout_images:
    train, val = data.split_train(*train, cfg.heldout_images, seed=cfg.seed)
  if cfg.num_train_images:
    train = data.subset(*train, cfg.num_train_images, seed=cfg.seed)
  if cfg.num_eval_images:
    val = data.subset(*val, cfg.num_eval_images, seed=cfg.seed)
  if cfg.num_test_images:
    test = data.subset(*test, cfg.num_test_images, seed=cfg.seed)
  if len(train[0]) < cfg.batch_size:
    raise ValueError(f'--batch_size={cfg.batch_size} exceeds the {len(train[0])} training images')
  return {'train': train, 'val': val, 'test': test}


SUMMARY_FILE = 'summary.json'


def disconnection(genotype) -> str | None:
  """A line saying that the derived cell joins no path from its input to its
  output (NB201's ``Arch.disconnection``), else None (also for a genotype type
  without that check: the DARTS space's)."""
  check = getattr(genotype, 'disconnection', None)
  return check() if check else None


def output_files(space: str = spaces.DEFAULT) -> list[str]:
  """The files a finished search leaves in its workdir (besides checkpoints and metrics)."""
  return reporting.search_report_files(spaces.get(space)) + [SUMMARY_FILE]


class SearchTask(loop.Task):
  """The search as loop.run runs it: w and α in one step per batch, the
  search validation and the derived child evaluated after each epoch, the
  genotypes handed off in the last checkpoint."""

  name = 'search'
  lr_fields = LR_FIELDS
  lr_flags = '--w_lr / --alpha_lr'
  eval_losses = {'search_val_loss': 'search validation loss', 'child_loss': 'child loss'}

  def __init__(self, cfg: SearchConfig):
    """Every check that needs no compile (data, batch sizes) happens here."""
    self.cfg = cfg
    self.space = spaces.get(cfg.space)
    self.backend = backends.get(backends.resolve(cfg.backend, dtype=cfg.dtype))
    self.benchmark = benchmark.check_benchmark_flag(cfg.space, cfg.benchmark_dir)
    arrays = load_data(cfg)
    self.mesh = parallel.make_mesh()
    parallel.check_batch_size(cfg.batch_size, self.mesh)
    parallel.check_batch_size(cfg.eval_batch_size, self.mesh, '--eval_batch_size')
    procs = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                 dataset=cfg.dataset)
    self.train_iter = data.BatchIterator(*arrays['train'], cfg.batch_size, seed=cfg.seed,
                                         train=True, **procs)
    self.eval_iters = {split: data.BatchIterator(*arrays[split], cfg.eval_batch_size,
                                                 seed=cfg.seed, train=False, **procs)
                       for split in ('val', 'test')}
    self.image_shape = arrays['train'][0].shape[1:]
    self.config = config_lib.to_dict(cfg)
    self.epochs, self.steps_per_epoch = cfg.epochs, self.train_iter.steps_per_epoch
    self.checkpoint_every_steps, self.stop_after_step = cfg.checkpoint_every_steps, cfg.stop_after_step
    self.net = make_network(cfg)
    self.tx = make_optimizer(cfg, self.steps_per_epoch)
    self.lr_schedule = learning_rate_schedule(cfg, self.steps_per_epoch)
    self._steps = None

  def abstract_state(self):
    return checkpoint.abstract_like(abstract_state(self.cfg, self.net, self.tx, self.image_shape),
                                    parallel.replicated(self.mesh))

  def init_state(self):
    return init_state(self.cfg, self.net, self.tx, self.image_shape,
                      parallel.replicated(self.mesh), self.backend)

  def check_meta(self, meta, workdir):
    check_resume_config(meta['config'], self.cfg, workdir)

  def _compiled(self):
    """(train step, eval step), built when first needed (a finished rerun needs neither)."""
    if self._steps is None:
      model = self.backend.bind(self.net)
      tables = costs.penalty_tables(self.cfg.channels, self.cfg.layers, self.cfg.image_size,
                                    self.cfg.kinds(), self.cfg.resource_transform, self.space)
      self._steps = (make_train_step(self.cfg, model, self.tx, tables, self.mesh),
                     make_eval_step(model, self.mesh))
    return self._steps

  def epoch_inputs(self, epoch):
    return (sampling.temperature(epoch, self.cfg.epochs, self.cfg.tau0, self.cfg.tau_min),)

  def batches(self, epoch, start):
    return (parallel.to_global(b, self.mesh) for b in self.train_iter.epoch(epoch, start_step=start))

  def train_step(self, state, batch, tau):
    return self._compiled()[0](state, batch, tau)

  def evaluate(self, state, epoch, stops):
    """Stochastic samples at the epoch's τ (the paper's "search validation")
    and the derived child without finetuning (Table 1)."""
    cfg, eval_step = self.cfg, self._compiled()[1]
    tau, = self.epoch_inputs(epoch)
    alpha = state.params['alpha']
    eval_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), epoch)
    sample_z = lambda i: {t: z[0] for t, z in arch_weights(
        cfg, alpha, jax.random.fold_in(eval_key, i), tau).items()}
    child_z = child_arch_weights(cfg, alpha)
    search_val = evaluate(eval_step, state, self.eval_iters['val'], self.mesh, sample_z, stops)
    child = evaluate(eval_step, state, self.eval_iters['val'], self.mesh, lambda i: child_z, stops)
    return {'tau': float(tau), 'search_val_loss': search_val['loss'],
            'search_val_acc': search_val['accuracy'], 'child_loss': child['loss'],
            'child_acc': child['accuracy'],
            **arch_summary(cfg, alpha, child_z, self.cfg.image_size),
            **self.benchmark_record(child_genotype(cfg, alpha))}

  def benchmark_record(self, genotype) -> dict:
    """The derived cell's record in --benchmark_dir ({} without one)."""
    return self.benchmark.record(str(genotype)) if self.benchmark else {}

  def record(self, epoch, train, evals, epoch_time, steps_run):
    return {'tau': evals['tau'], 'lr': float(self.lr_schedule(epoch * self.steps_per_epoch)),
            'train_loss': train['loss'], 'train_acc': train['accuracy'],
            **{k: v for k, v in evals.items() if k != 'tau'},
            'epoch_time_s': epoch_time,
            'images_per_s': steps_run * self.cfg.batch_size / max(epoch_time, 1e-9)}

  def epoch_line(self, epoch, record):
    return (f'epoch {epoch + 1}: train acc {record["train_acc"]:.4f}, search val acc '
            f'{record["search_val_acc"]:.4f}, child acc {record["child_acc"]:.4f}, '
            f'tau {record["tau"]:.3f}')

  def finish(self, state):
    """Hand-off: the genotypes go into the last checkpoint (train.py restores them)."""
    alpha = state.params['alpha']
    child_z = child_arch_weights(self.cfg, alpha)
    test = evaluate(self._compiled()[1], state, self.eval_iters['test'], self.mesh,
                    lambda i: child_z)
    return {'child_test_acc': test['accuracy'],
            'genotypes': {k: g.to_dict() for k, g in
                          derive_genotypes(alpha, self.cfg.space).items()}}

  def outputs(self):
    return output_files(self.cfg.space)

  def write_outputs(self, workdir, state, meta):
    final = derive_genotypes(state.params['alpha'], self.cfg.space)
    alpha_np = {k: np.asarray(v) for k, v in state.params['alpha'].items()}
    reporting.write_search_report(workdir, final, alpha_np, meta['records'], self.space)
    genotype = final[methods.get(self.cfg.method).derivation]
    summary = {'child_test_acc': meta['child_test_acc'], 'elapsed_s': meta['elapsed_s'],
               'method': self.cfg.method, 'space': self.cfg.space,
               'genotype': genotype.to_dict(),
               'last_epoch': meta['records'][-1] if meta['records'] else None}
    if disconnection(genotype):
      summary['disconnection'] = disconnection(genotype)
    if self.benchmark:
      summary['benchmark'] = self.benchmark_record(genotype)
    loop.write_json(os.path.join(workdir, SUMMARY_FILE), summary)

  def final_line(self, workdir, meta):
    genotype = self.space.genotype_type.from_dict(
        meta['genotypes'][methods.get(self.cfg.method).derivation])
    cut = disconnection(genotype)
    return (f'search finished: child test accuracy {meta["child_test_acc"]:.4f}; genotype in '
            f'{os.path.join(workdir, "genotype.json")}' + (f'; WARNING: {cut}' if cut else ''))


def run(cfg: SearchConfig, workdir: str) -> dict:
  """Searches (or resumes the search in ``workdir``) and writes every output;
  returns the checkpoint's metadata (loop.run: the stops and errors)."""
  config_lib.validate(cfg)
  loop.check_workdir(workdir)
  return loop.run(SearchTask(cfg), workdir).meta
