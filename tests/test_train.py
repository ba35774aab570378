"""Tests for snas_jax.train: architecture sources, sizes, losses, the loop, resume, errors."""
import dataclasses
import functools
import io
import json
import math
import os
import re
import signal
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import damage_checkpoint, run_script, write_imagenet_metadata
from snas_jax import checkpoint, data, parallel, train, loop


# A small cell that still has every kind of edge: a conv, a dilated conv,
from snas_jax.spaces.darts import genotypes
# both pools, identity and FactorizedReduce skips, a 'none' edge and an
# empty node (zeros). Compiles fast.
TINY = genotypes.Genotype(
    normal=[[('sep_conv_3x3', 0), ('skip_connect', 1)], [('dil_conv_3x3', 2)],
            [('max_pool_3x3', 1), ('none', 3)], [('avg_pool_3x3', 0)]],
    reduce=[[('max_pool_3x3', 0), ('skip_connect', 1)], [('sep_conv_3x3', 2)], [],
            [('skip_connect', 0)]])


def _one_line(err) -> str:
  message = str(err.value)
  assert '\n' not in message, message
  return message


# ----------------------------------------------------------------------------
# Architecture sources.


@pytest.mark.parametrize('kwargs,got', [({}, 'none of them'),
                                        ({'arch': 'DARTS_V2', 'genotype_json': 'g.json'},
                                         '--genotype_json and --arch')])
def test_exactly_one_arch_source(kwargs, got):
  with pytest.raises(ValueError, match='exactly one of') as err:
    train.TrainConfig(**kwargs).check()
  assert f'(got {got})' in _one_line(err)


def test_genotype_json_round_trip(tmp_path):
  path = tmp_path / 'g.json'
  path.write_text(genotypes.SNAS_MILD.to_json())
  assert train.resolve_genotype(train.TrainConfig(genotype_json=str(path))) == genotypes.SNAS_MILD
  # A search's genotype.json: one genotype per derivation rule.
  path.write_text(json.dumps({'snas': genotypes.SNAS_MILD.to_dict(),
                              'darts': genotypes.DARTS_V2.to_dict()}))
  config = train.TrainConfig(genotype_json=str(path), derive_rule='darts')
  assert train.resolve_genotype(config) == genotypes.DARTS_V2


@pytest.mark.parametrize('text,message', [
    (json.dumps({'normal': [[['conv_9x9', 0]], [], [], []], 'reduce': [[], [], [], []]}),
     "unknown op 'conv_9x9'"),
    ('{"normal": [', 'is not valid JSON'),
    (None, 'cannot be read')])
def test_genotype_json_errors_are_one_line(tmp_path, text, message):
  path = tmp_path / 'g.json'
  if text is not None:
    path.write_text(text)
  with pytest.raises(ValueError, match=message) as err:
    train.resolve_genotype(train.TrainConfig(genotype_json=str(path)))
  assert str(path) in _one_line(err)


def _fake_search_workdir(workdir, genotype, finished=True):
  """A search workdir as search.run leaves it (its hand-off: Orbax meta with the genotypes).

  Stands in for a real search, which takes minutes here even at its smallest
  (see test_retrain_after_real_search_cli for the real thing).
  """
  ckpt = checkpoint.Checkpointer(str(workdir))
  meta = {'config': {'epochs': 2}, 'epoch': 2 if finished else 1, 'finished': finished}
  if finished:
    meta['genotypes'] = {'snas': genotype.to_dict(), 'darts': genotypes.DARTS_V2.to_dict()}
  ckpt.save(8, {'step': np.int32(8)}, meta)
  ckpt.close()


def test_search_workdir_without_finished_search(tmp_path):
  pytest.importorskip('snas_jax.search')
  with pytest.raises(checkpoint.CheckpointError, match='no search checkpoint') as err:
    train.resolve_genotype(train.TrainConfig(search_workdir=str(tmp_path)))
  _one_line(err)
  _fake_search_workdir(tmp_path / 's', TINY, finished=False)
  with pytest.raises(checkpoint.CheckpointError, match='unfinished search') as err:
    train.resolve_genotype(train.TrainConfig(search_workdir=str(tmp_path / 's')))
  _one_line(err)


def test_checkpoint_of_another_network_is_one_line(tmp_path):
  """A checkpoint whose variables differ from the network's (another version
  of the code renamed or reshaped them) fails in one line, not Orbax's diff."""
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, {'w': {'kernel': np.ones(3, np.float32)}}, {'epoch': 1})
  ckpt.wait()
  # jax arrays: their abstract values carry a sharding, as the scripts' do.
  for other in ({'w': {'depthwise_kernel': jnp.ones(3)}},  # renamed
                {'w': {'kernel': jnp.ones(4)}}):  # reshaped
    with pytest.raises(checkpoint.CheckpointError, match='step 3 .* does not fit') as err:
      ckpt.restore(checkpoint.abstract_like(other))
    assert 'new --workdir' in _one_line(err)
    with pytest.raises(checkpoint.CheckpointError, match='step 3 .* does not fit') as err:
      ckpt.restore_latest(checkpoint.abstract_like(other))  # not set aside: it reads
    assert 'new --workdir' in _one_line(err)
  state, meta = ckpt.restore(checkpoint.abstract_like({'w': {'kernel': jnp.zeros(3)}}))
  np.testing.assert_array_equal(state['w']['kernel'], 1.0)
  assert meta == {'epoch': 1}
  ckpt.close()


# ----------------------------------------------------------------------------
# Sizes: an independent multiply-add count from docs/algorithm.md's op definitions (the
# parameter count's twin is in test_child_model.py). Convolutions and the
# classifier only; pools, BN and sums are not multiply-adds.


def _op_madds(name, c, side, stride):
  """Multiply-adds of one edge with C channels and a side x side output."""
  if name in ('none', 'max_pool_3x3', 'avg_pool_3x3'):
    return 0
  if name == 'skip_connect':  # FactorizedReduce: two 1x1 convs C -> C/2 at the output size
    return 0 if stride == 1 else 2 * side * side * c * (c // 2)
  k = int(name[-1])
  dil_conv = side * side * (c * k * k + c * c)  # depthwise kxk + 1x1, at the output size
  return 2 * dil_conv if name.startswith('sep_conv') else dil_conv


def _closed_form_madds(genotype, c, layers, dataset, size):
  if dataset == 'cifar10':
    total, side = size * size * 27 * 3 * c, size
    c_pp = c_p = 3 * c
    classes = 10
  else:  # stem0: 3x3/2 3 -> C/2, 3x3/2 C/2 -> C; stem1: 3x3/2 C -> C
    half = c // 2
    total = ((size // 2) ** 2 * 27 * half + (size // 4) ** 2 * 9 * half * c
             + (size // 8) ** 2 * 9 * c * c)
    side, c_pp, c_p, classes = size // 8, c, c, 1000
  c_cell = c
  for i in range(layers):
    reduction = i in (layers // 3, 2 * layers // 3)
    c_cell *= 2 if reduction else 1
    # Both preprocessings produce side x side x C from C_pp / C_p channels
    # (FactorizedReduce: two half-width 1x1 convs on the twice larger s0).
    total += side * side * (c_pp + c_p) * c_cell
    out_side = side // 2 if reduction else side
    for node in (genotype.reduce if reduction else genotype.normal):
      for op, state in node:
        stride = 2 if reduction and state < 2 else 1
        total += _op_madds(op, c_cell, out_side, stride)
    side = out_side
    c_pp, c_p = c_p, len(genotype.concat) * c_cell
  return total + c_p * classes


def test_multiply_adds_match_closed_form():
  config = train.imagenet_config(arch='SNAS_moderate')
  expected = _closed_form_madds(genotypes.SNAS_MODERATE, 48, 14, 'imagenet', 224)
  assert train.count_multiply_adds(genotypes.SNAS_MODERATE, config) == expected
  small = train.TrainConfig(genotype_json='unused', channels=8, layers=5)
  assert train.count_multiply_adds(TINY, small) == _closed_form_madds(TINY, 8, 5, 'cifar10', 32)


def test_summary_prints_params_and_multiply_adds(capsys):
  summary = train.print_summary(train.TrainConfig(arch='DARTS_V2'))
  line = capsys.readouterr().out.strip()
  # Checked against the closed forms (here and in test_child_model.py).
  assert summary['params'] == 3351502
  assert summary['multiply_adds'] == _closed_form_madds(genotypes.DARTS_V2, 36, 20, 'cifar10', 32)
  assert line == ('--arch=DARTS_V2 on cifar10 (C=36, L=20, 32x32): params 3.35M (3351502, '
                  'auxiliary head excluded), multiply-adds 528.4M (528359040) per image')


def test_mobile_setting_limit():
  config = train.imagenet_config(arch='DARTS_V2')
  train.check_mobile_setting(config, 599_000_000)
  with pytest.raises(ValueError, match='--allow_large') as err:
    train.check_mobile_setting(config, 601_000_000)
  _one_line(err)
  train.check_mobile_setting(dataclasses.replace(config, allow_large=True), 601_000_000)
  train.check_mobile_setting(train.TrainConfig(arch='DARTS_V2'), 10**9)  # CIFAR: no limit


# ----------------------------------------------------------------------------
# Losses, schedules, data.


def test_label_smoothing_hand_example():
  logits = jnp.array([[2.0, 1.0, 0.0]])
  log_p = np.array([2.0, 1.0, 0.0]) - math.log(math.exp(2) + math.exp(1) + 1)
  # Targets (1 - 0.1)·one_hot(1) + 0.1/3: [0.0333, 0.9333, 0.0333].
  expected = -(0.1 / 3 * log_p[0] + (0.9 + 0.1 / 3) * log_p[1] + 0.1 / 3 * log_p[2])
  np.testing.assert_allclose(train.cross_entropy(logits, jnp.array([1]), 0.1), [expected],
                             rtol=1e-6)
  np.testing.assert_allclose(train.cross_entropy(logits, jnp.array([1]), 0.0), [-log_p[1]],
                             rtol=1e-6)
  assert train.imagenet_config(arch='DARTS_V2').label_smoothing == 0.1


def test_auxiliary_weight_enters_the_loss():
  assert train.TrainConfig().auxiliary_weight == 0.4
  labels = jnp.array([0, 2])
  logits = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
  aux_logits = jnp.array([[0.0, 3.0, 0.0], [0.2, 0.0, 0.0]])
  total, main, aux = train.training_loss(logits, aux_logits, labels, aux_weight=0.4, smoothing=0.0)
  np.testing.assert_allclose(main, train.cross_entropy(logits, labels).mean(), rtol=1e-6)
  np.testing.assert_allclose(aux, train.cross_entropy(aux_logits, labels).mean(), rtol=1e-6)
  np.testing.assert_allclose(total, main + 0.4 * aux, rtol=1e-6)
  total, main, _ = train.training_loss(logits, None, labels, aux_weight=0.4, smoothing=0.0)
  assert total == main


def test_schedules():
  """optax's schedules, per epoch, equal the closed forms the reference uses
  (PyTorch's CosineAnnealingLR / ExponentialLR stepped once per epoch)."""
  config = train.TrainConfig(arch='DARTS_V2', epochs=600, lr_min=1e-4)
  epochs = np.arange(600)
  cosine = 1e-4 + (0.025 - 1e-4) * 0.5 * (1 + np.cos(np.pi * epochs / 600))
  # float32 arithmetic: within a few ulps of the initial rate.
  np.testing.assert_allclose([train.learning_rate(config, e) for e in epochs], cosine, rtol=2e-6,
                             atol=1e-8)
  assert train.learning_rate(config, 0) == np.float32(0.025)
  assert train.drop_path_rate(config, 0) == 0 and train.drop_path_rate(config, 300) == 0.1
  imagenet = train.imagenet_config(arch='DARTS_V2')
  epochs = np.arange(250)
  # optax raises float32(0.97) to the epoch: 3e-8 relative per epoch.
  np.testing.assert_allclose([train.learning_rate(imagenet, e) for e in epochs],
                             0.1 * 0.97 ** epochs, rtol=1e-5)
  assert imagenet.weight_decay == 3e-5 and imagenet.drop_path_prob == 0


def test_train_pipeline_enables_cutout():
  rng = np.random.default_rng(0)
  arrays = {f'{split}_{kind}': value for split in ('train', 'test') for kind, value in (
      ('images', rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)),
      ('labels', np.arange(64, dtype=np.int32) % 10))}
  config = train.TrainConfig(arch='DARTS_V2', batch_size=16, num_train_images=32)
  train_it, test_it = train.cifar_iterators(config, arrays)
  assert train_it.cutout == 16 and train_it.train and len(train_it.labels) == 32
  assert not test_it.train  # no augmentation (hence no cutout) at test time
  # A 16x16 square of zeros (normalised pixels are almost never exactly 0).
  assert ((train_it.batch(0, 0)['image'] == 0).all(-1).sum((1, 2)) >= 8 * 8).all()


# ----------------------------------------------------------------------------
# The loop on a miniature CIFAR-10 folder.


def _jpeg(image):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG')
  return np.frombuffer(buf.getvalue(), np.uint8)


@pytest.fixture(scope='module')
def tiny_cifar(tmp_path_factory):
  """A CIFAR-10 folder in the real npz format: 64 train, 32 test images."""
  folder = tmp_path_factory.mktemp('cifar')
  rng = np.random.default_rng(0)
  for split, n in (('train', 64), ('test', 32)):
    jpegs = [_jpeg(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    offsets = np.cumsum([0] + [len(j) for j in jpegs]).astype(np.int64)
    np.savez(folder / f'{split}.npz', jpeg=np.concatenate(jpegs), offsets=offsets,
             labels=(np.arange(n) % 10).astype(np.uint8), classes=np.array(['c'] * 10))
  manifest = {'train': {'images': 64}, 'test': {'images': 32}}
  (folder / 'MANIFEST.json').write_text(json.dumps(manifest))
  return str(folder)


@pytest.fixture
def no_home_cache(monkeypatch, tmp_path):
  monkeypatch.setattr(train.data, 'load_cifar', functools.partial(
      data.load_cifar, cache_dir=str(tmp_path / 'cache')))


def _tiny_config(data_dir, **overrides):
  kw = dict(data_dir=data_dir, channels=4, layers=3, batch_size=16, epochs=2, backend='reference',
            checkpoint_every_steps=2, progress=False)
  return train.TrainConfig(**{**kw, **overrides})


def test_retrain_from_search_workdir_resume_and_errors(tiny_cifar, tmp_path, no_home_cache):
  pytest.importorskip('snas_jax.search')
  _fake_search_workdir(tmp_path / 'search', TINY)
  config = _tiny_config(tiny_cifar, search_workdir=str(tmp_path / 'search'))
  final = train.train_and_evaluate(config, str(tmp_path / 'a'))
  assert final['genotype'] == TINY.to_dict() and final['eval_images'] == 32
  assert 0 <= final['test_error'] <= 100
  assert json.loads((tmp_path / 'a' / train.FINAL_FILE).read_text()) == final
  records = [json.loads(l) for l in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['epoch']) for r in records] == [(4, 1), (8, 2)]
  assert [r['drop_path_rate'] for r in records] == [0.0, 0.1]  # the ramp, 0 -> 0.2
  assert (tmp_path / 'a' / 'tensorboard').is_dir()

  # Stopped mid-epoch and resumed: the same run, bit for bit; the step never retraced.
  genotype_file = tmp_path / 'tiny.json'
  genotype_file.write_text(TINY.to_json())
  config = _tiny_config(tiny_cifar, genotype_json=str(genotype_file))
  stopped = train.train_and_evaluate(dataclasses.replace(config, stop_after_step=3),
                                     str(tmp_path / 'b'))
  assert stopped == {'stopped_at_step': 3}
  # A diverging resume (another learning rate is allowed) stops at its first
  # non-finite step, naming it, and saves nothing of it.
  # (Here the update is huge but finite; the epoch end's evaluation overflows.)
  with pytest.raises(loop.NonFiniteError, match=r'after step 4 \(epoch 1\).* the checkpoint at '
                     r'step 3 is kept: rerun the same command with a lower --learning_rate') as err:
    train.train_and_evaluate(dataclasses.replace(config, learning_rate=1e30), str(tmp_path / 'b'))
  _one_line(err)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'b'), read_only=True)
  assert ckpt.latest_step() == 3
  abstract = checkpoint.abstract_like(steps_abstract(config))
  saved, _ = ckpt.restore(abstract)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved) if np.issubdtype(x.dtype, np.floating))
  # The advice works: the same command resumes from step 3, as if nothing happened.
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert resumed['test_loss'] == final['test_loss']
  assert resumed['test_error'] == final['test_error']
  steps = train.make_steps(config, TINY, train.parallel.make_mesh(), steps_per_epoch=4)
  assert steps.train._cache_size() == 1  # lr and drop-path rate are arrays

  # SIGINT (Ctrl-C): a checkpoint at the next step boundary, one line, the
  # resumed run the same, bit for bit.
  before = signal.getsignal(signal.SIGINT)

  def interrupt_once_handled():
    deadline = time.time() + 120
    while signal.getsignal(signal.SIGINT) is before and time.time() < deadline:
      time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGINT)

  threading.Thread(target=interrupt_once_handled, daemon=True).start()
  with pytest.raises(loop.Interrupted, match=r'^stopped by SIGINT after step (\d+);') as err:
    train.train_and_evaluate(config, str(tmp_path / 'd'))
  assert err.value.code == 130 and _one_line(err).endswith('rerun the same command to resume')
  stopped_at = int(re.match(r'stopped by SIGINT after step (\d+);', str(err.value)).group(1))
  assert checkpoint.Checkpointer(str(tmp_path / 'd'), read_only=True).latest_step() == stopped_at
  assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
  resumed = train.train_and_evaluate(config, str(tmp_path / 'd'))
  assert resumed['test_loss'] == final['test_loss']

  # SIGINT during the evaluation abandons it; the resumed run evaluates again.
  real_make_data = train.make_data

  def interrupting_data(config):
    source = real_make_data(config)

    def evaluate():
      os.kill(os.getpid(), signal.SIGINT)
      yield from source.evaluate()
    return source._replace(evaluate=evaluate)

  train.make_data = interrupting_data
  try:
    with pytest.raises(loop.Interrupted, match='^stopped by SIGINT after step 4;'):
      train.train_and_evaluate(config, str(tmp_path / 'e'))
  finally:
    train.make_data = real_make_data
  assert checkpoint.Checkpointer(str(tmp_path / 'e'), read_only=True).latest_step() == 4
  assert not (tmp_path / 'e' / 'metrics.jsonl').read_text()  # epoch 1 not yet evaluated
  resumed = train.train_and_evaluate(config, str(tmp_path / 'e'))
  assert resumed['test_loss'] == final['test_loss']

  # A damaged latest checkpoint (unreadable metadata) is set aside: the run
  # resumes from the one before and ends the same, bit for bit.
  train.train_and_evaluate(dataclasses.replace(config, stop_after_step=3), str(tmp_path / 'g'))
  damage_checkpoint(tmp_path / 'g' / checkpoint.CHECKPOINT_DIR / '3', 'garbage metadata')
  resumed = train.train_and_evaluate(config, str(tmp_path / 'g'))
  assert resumed['test_loss'] == final['test_loss']
  assert '3.damaged' in os.listdir(tmp_path / 'g' / checkpoint.CHECKPOINT_DIR)
  # final.json lost (a kill while it was written): the rerun writes it again.
  os.remove(tmp_path / 'g' / train.FINAL_FILE)
  assert train.train_and_evaluate(config, str(tmp_path / 'g')) == resumed
  assert json.loads((tmp_path / 'g' / train.FINAL_FILE).read_text()) == resumed

  # Another configuration in the same workdir: a one-line error, before any compile.
  with pytest.raises(checkpoint.CheckpointError, match="--channels=4 there, --channels=6 now") as err:
    train.train_and_evaluate(dataclasses.replace(config, channels=6), str(tmp_path / 'b'))
  _one_line(err)

  # Divergence from the start names the step; nothing was saved.
  with pytest.raises(loop.NonFiniteError, match=r'at step \d+ \(epoch 1\).* no checkpoint '
                     r'was written yet') as err:
    train.train_and_evaluate(dataclasses.replace(config, learning_rate=1e30), str(tmp_path / 'c'))
  _one_line(err)
  assert checkpoint.Checkpointer(str(tmp_path / 'c'), read_only=True).latest_step() is None
  # An error while a save is in flight waits for it: complete, no tmp folder.
  with pytest.raises(loop.NonFiniteError, match=r'the checkpoint at step 1 is kept'):
    train.train_and_evaluate(dataclasses.replace(config, learning_rate=1e30,
                                                 checkpoint_every_steps=1), str(tmp_path / 'f'))
  assert checkpoint.Checkpointer(str(tmp_path / 'f'), read_only=True).latest_step() == 1
  assert os.listdir(tmp_path / 'f' / 'checkpoints') == ['1']
  # A resume with another learning rate is recorded in the checkpoint's metadata.
  train.train_and_evaluate(dataclasses.replace(config, stop_after_step=2), str(tmp_path / 'c'))
  train.train_and_evaluate(dataclasses.replace(config, learning_rate=0.01), str(tmp_path / 'c'))
  meta = checkpoint.Checkpointer(str(tmp_path / 'c'), read_only=True).restore_meta()
  assert meta['resumes'] == [{'step': 2, 'changed': {'learning_rate': [0.025, 0.01]},
                              'device_count': jax.device_count()}]
  assert meta['config']['learning_rate'] == 0.01


def steps_abstract(config):
  return train.make_steps(config, TINY, train.parallel.make_mesh(), 4).abstract_state()


def test_retrain_after_real_search_cli(tmp_path, cifar_dir, tiny_search_workdir):
  """The hand-off: a finished search's workdir is retrained through the CLI."""
  child_run = run_script('train_cifar.py', f'--workdir={tmp_path / "child"}',
                         f'--search_workdir={tiny_search_workdir}', f'--data_dir={cifar_dir}',
                         '--channels=4', '--batch_size=32', '--num_train_images=64',
                         '--num_eval_images=32', '--epochs=1', '--layers=3', '--backend=reference',
                         '--noprogress')
  assert child_run.returncode == 0, child_run.stderr[-3000:]
  final = json.loads((tmp_path / 'child' / train.FINAL_FILE).read_text())
  searched = json.loads((tiny_search_workdir / 'genotype.json').read_text())
  assert final['genotype'] == searched['snas'] and final['eval_images'] == 32


# ----------------------------------------------------------------------------
# ImageNet.


def test_missing_imagenet_download_is_one_line(tmp_path):
  config = train.imagenet_config(arch='DARTS_V2', channels=8, layers=3,
                                 tfds_data_dir=str(tmp_path))
  with pytest.raises(data.DataError, match='--tfds_data_dir') as err:
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  _one_line(err)
  assert not (tmp_path / 'work').exists()  # failed before creating anything


def test_imagenet_one_step_under_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  write_imagenet_metadata(tmp_path, 8)
  config = train.imagenet_config(arch='SNAS_mild', channels=8, layers=3, batch_size=4, epochs=1,
                                 num_train_images=4, num_eval_images=4, backend='reference',
                                 tfds_data_dir=str(tmp_path / 'unused'), progress=False)
  with tfds.testing.mock_data(num_examples=8, data_dir=str(tmp_path)):
    final = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert final['dataset'] == 'imagenet' and final['eval_images'] == 4
  assert math.isfinite(final['test_loss']) and 0 <= final['test_top5_error'] <= 100
  [record] = [json.loads(l) for l in (tmp_path / 'work' / 'metrics.jsonl').read_text().splitlines()]
  assert record['step'] == 1 and record['lr'] == pytest.approx(0.1)
  assert math.isfinite(record['train_aux_ce'])  # the auxiliary head ran (7x7 map at 224)


def test_child_init_is_seeded_bounded_and_matches_its_abstract_state():
  """Steps.init draws the child's parameters (--init=pytorch: PyTorch's
  defaults) deterministically per seed, within U(±1/sqrt(fan_in)), shaped as
  abstract_state (what a resumed run restores into), on either backend."""
  config = train.TrainConfig(genotype_json='unused', channels=8, layers=5, init='pytorch')
  steps = train.make_steps(config, genotypes.SNAS_MILD, parallel.make_mesh(), 1)

  def kernels(seed):
    state = steps.init(seed)
    return state, {jax.tree_util.keystr(path): np.asarray(x) for path, x in
                   jax.tree_util.tree_leaves_with_path(state.params) if path[-1].key.endswith('kernel')}

  state, first = kernels(0)
  chex.assert_trees_all_equal_shapes_and_dtypes(steps.abstract_state(), state)
  _, again = kernels(0)
  _, other = kernels(1)
  stem = next(k for k in first if 'stem' in k)  # [3, 3, 3, C_stem]: fan_in 27
  assert 0.9 / np.sqrt(27) < np.abs(first[stem]).max() <= 1 / np.sqrt(27)
  assert len({float(v.ravel()[0]) for v in first.values()}) == len(first)  # no shared chunks
  chex.assert_trees_all_equal(first, again)
  assert not np.allclose(first[stem], other[stem])
