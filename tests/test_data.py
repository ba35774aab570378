"""Tests for snas_jax.data: CIFAR-10 loading/caching, splits, batches, ImageNet."""
import glob
import io
import json
import os
import threading
import time

import numpy as np
import pytest

from conftest import write_imagenet_metadata, write_tfds_metadata

from snas_jax import data

CIFAR_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10')


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
  """(arrays, cache_dir): the real local copy, decoded once for the whole file."""
  if not os.path.isfile(os.path.join(CIFAR_DIR, 'train.npz')):
    pytest.skip(f'local CIFAR-10 copy not found at {os.path.normpath(CIFAR_DIR)}')
  cache_dir = str(tmp_path_factory.mktemp('cache'))
  return data.load_cifar(CIFAR_DIR, cache_dir=cache_dir), cache_dir


def _random_images(n, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, n).astype(np.int32))


def _jpeg(value):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format='JPEG')
  return np.frombuffer(buf.getvalue(), np.uint8)


def _write_fake(folder, train_jpegs, test_jpegs, manifest=None):
  """A miniature CIFAR folder in the real format."""
  os.makedirs(folder, exist_ok=True)
  for split, jpegs in (('train', train_jpegs), ('test', test_jpegs)):
    offsets = np.cumsum([0] + [len(j) for j in jpegs]).astype(np.int64)
    np.savez(os.path.join(folder, f'{split}.npz'), jpeg=np.concatenate(jpegs), offsets=offsets,
             labels=np.arange(len(jpegs), dtype=np.uint8) % 10, classes=np.array(['a'] * 10))
  if manifest is None:
    manifest = {'train': {'images': len(train_jpegs)}, 'test': {'images': len(test_jpegs)}}
  with open(os.path.join(folder, 'MANIFEST.json'), 'w') as f:
    json.dump(manifest, f)


# ----------------------------------------------------------------------------
# load_cifar


def test_load_cifar10_real(cifar):
  arrays, _ = cifar
  assert arrays['train_images'].shape == (50000, 32, 32, 3)
  assert arrays['test_images'].shape == (10000, 32, 32, 3)
  assert arrays['train_images'].dtype == np.uint8 and arrays['test_images'].dtype == np.uint8
  assert arrays['train_labels'].dtype == np.int32 and arrays['test_labels'].dtype == np.int32
  np.testing.assert_array_equal(np.bincount(arrays['train_labels']), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(arrays['test_labels']), [1000] * 10)
  # JPEG round trip shifts pixels a little; measured |diff| < 0.05 per channel.
  mean = arrays['train_images'].reshape(-1, 3).mean(0)
  np.testing.assert_allclose(mean, np.array(data.CIFAR_MEAN) * 255, atol=1.0)


def test_load_cifar10_second_call_hits_cache(cifar, monkeypatch):
  arrays, cache_dir = cifar
  [cache] = glob.glob(os.path.join(cache_dir, 'cifar10_*.npz'))
  mtime = os.path.getmtime(cache)

  def no_decoding(*args):
    raise AssertionError('decoded again instead of reading the cache')
  monkeypatch.setattr(data, '_decode_npz', no_decoding)
  again = data.load_cifar(CIFAR_DIR, cache_dir=cache_dir)
  assert os.path.getmtime(cache) == mtime
  for key, value in arrays.items():
    np.testing.assert_array_equal(again[key], value)


def test_fake_folder_loads(tmp_path):
  _write_fake(tmp_path / 'c', [_jpeg(10), _jpeg(200)], [_jpeg(90)])
  arrays = data.load_cifar(str(tmp_path / 'c'), cache_dir=str(tmp_path / 'cache'))
  assert arrays['train_images'].shape == (2, 32, 32, 3)
  np.testing.assert_allclose(arrays['train_images'].mean((1, 2, 3)), [10, 200], atol=2)
  np.testing.assert_array_equal(arrays['train_labels'], [0, 1])


def _corrupt_file(folder):
  _write_fake(folder, [_jpeg(10)], [_jpeg(20)])
  with open(os.path.join(folder, 'test.npz'), 'wb') as f:
    f.write(b'this is not a zip file')


def _count_mismatch(folder):
  _write_fake(folder, [_jpeg(10)], [_jpeg(20)], {'train': {'images': 3}, 'test': {'images': 1}})


def _sha_mismatch(folder):
  _write_fake(folder, [_jpeg(10)], [_jpeg(20)], {'train': {'images': 1, 'sha256': '0' * 64}})


def _corrupt_jpeg(folder):
  _write_fake(folder, [_jpeg(10), np.frombuffer(b'\xff\xd8 broken', np.uint8)], [_jpeg(20)])


def _missing_file(folder):
  _write_fake(folder, [_jpeg(10)], [_jpeg(20)])
  os.remove(os.path.join(folder, 'train.npz'))


@pytest.mark.parametrize('make', [None, _missing_file, _corrupt_file, _count_mismatch,
                                  _sha_mismatch, _corrupt_jpeg])
def test_load_cifar10_errors_name_the_flag(tmp_path, make):
  folder = str(tmp_path / 'c')
  if make:  # None: the folder does not exist
    make(folder)
  with pytest.raises(data.DataError) as err:
    data.load_cifar(folder, cache_dir=str(tmp_path / 'cache'))
  assert '--data_dir' in str(err.value) and '\n' not in str(err.value)


# ----------------------------------------------------------------------------
# Where CIFAR-10 comes from: --data_dir=auto (the default), a folder, or tfds.


@pytest.fixture
def no_local_copy(monkeypatch, tmp_path):
  """Neither $SNAS_JAX_DATA_DIR nor a copy beside the repository."""
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setattr(data, 'repository_cifar_dir', lambda: str(tmp_path / 'no_copy_here'))


def test_auto_reads_the_folder_named_by_the_environment(tmp_path, monkeypatch):
  folder = str(tmp_path / 'c')
  _write_fake(folder, [_jpeg(10), _jpeg(30)], [_jpeg(20)])
  monkeypatch.setenv(data.DATA_DIR_ENV, folder)
  lines = []
  arrays = data.load_cifar('auto', cache_dir=str(tmp_path / 'cache'), log=lines.append)
  assert arrays['train_images'].shape == (2, 32, 32, 3) and arrays['test_labels'].tolist() == [0]
  assert lines == [f'CIFAR-10: npz copy in {folder} ($SNAS_JAX_DATA_DIR)']


def test_auto_refuses_an_environment_variable_without_a_copy(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(data.DataError, match=r'\$SNAS_JAX_DATA_DIR=.* unset it') as err:
    data.load_cifar('auto')
  assert '\n' not in str(err.value)


def test_auto_finds_the_copy_beside_the_repository(monkeypatch, tmp_path):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  if not os.path.isfile(os.path.join(CIFAR_DIR, 'train.npz')):
    pytest.skip('no copy beside this checkout')
  monkeypatch.chdir(tmp_path)  # found beside the package, from any folder
  folder, why = data.resolve_cifar('auto')
  assert os.path.samefile(folder, CIFAR_DIR) and why == 'the folder beside the repository'
  assert data.resolve_cifar('') == (None, 'asked for by --data_dir=')
  assert data.resolve_cifar('/x') == ('/x', '--data_dir')


def test_auto_without_a_copy_takes_tfds(tmp_path, no_local_copy):
  tfds = pytest.importorskip('tensorflow_datasets')
  write_tfds_metadata('cifar10', tmp_path, {'train': 12, 'test': 4})
  lines = []
  with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
    arrays = data.load_cifar('auto', tfds_data_dir=str(tmp_path), log=lines.append)
  assert arrays['train_images'].shape == (12, 32, 32, 3)
  assert arrays['train_images'].dtype == np.uint8 and arrays['train_labels'].dtype == np.int32
  [line] = lines
  assert line.startswith('CIFAR-10: tensorflow-datasets, prepared in ' + str(tmp_path))
  assert '$SNAS_JAX_DATA_DIR unset and no copy at' in line


def _assert_both_ways_out(err):
  message = str(err.value)
  assert '\n' not in message
  assert '--data_dir=<folder with train.npz, test.npz>' in message and 'network' in message


def test_no_copy_and_no_network_is_one_line(tmp_path, monkeypatch, no_local_copy):
  def refuse(*args, **kwargs):
    raise OSError('Name or service not known')
  monkeypatch.setattr(data.socket, 'create_connection', refuse)
  start = time.perf_counter()
  with pytest.raises(data.DataError, match='www.cs.toronto.edu cannot be reached') as err:
    data.load_cifar('auto', tfds_data_dir=str(tmp_path / 'tfds'))
  assert time.perf_counter() - start < 30  # no minutes of download retries
  _assert_both_ways_out(err)


def test_failed_download_is_one_line(tmp_path, monkeypatch, no_local_copy):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(data, '_reachable', lambda host: True)

  def fail(self, *args, **kwargs):
    raise ConnectionError('connection reset\nby peer')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail)
  with pytest.raises(data.DataError, match='could not download and prepare CIFAR-10') as err:
    data.load_cifar('', tfds_data_dir=str(tmp_path / 'tfds'))
  _assert_both_ways_out(err)


# ----------------------------------------------------------------------------
# Splits


def test_split_train():
  images, labels = _random_images(1000)
  (ti, tl), (hi, hl) = data.split_train(images, labels, 100, seed=3)
  assert ti.shape == (900, 32, 32, 3) and hi.shape == (100, 32, 32, 3)
  # Rows are disjoint and together are the whole set (images are unique).
  keys = lambda x: {r.tobytes() for r in x}
  assert not keys(ti) & keys(hi) and keys(ti) | keys(hi) == keys(images)
  (ti2, _), (hi2, hl2) = data.split_train(images, labels, 100, seed=3)
  np.testing.assert_array_equal(hi2, hi)
  np.testing.assert_array_equal(hl2, hl)
  (_, _), (hi3, _) = data.split_train(images, labels, 100, seed=4)
  assert not np.array_equal(hi3, hi)


def test_subset_is_class_balanced():
  labels = np.repeat(np.arange(10), 100).astype(np.int32)  # sorted, like the npz
  images = np.arange(1000)
  sub_images, sub_labels = data.subset(images, labels, 250, seed=1)
  np.testing.assert_array_equal(np.bincount(sub_labels), [25] * 10)
  np.testing.assert_array_equal(labels[sub_images], sub_labels)
  assert len(set(sub_images.tolist())) == 250
  _, odd = data.subset(images, labels, 23, seed=1)
  assert set(np.bincount(odd, minlength=10)) == {2, 3}
  np.testing.assert_array_equal(data.subset(images, labels, 250, seed=1)[0], sub_images)
  assert data.subset(images, labels, 0)[0] is images
  assert data.subset(images, labels, 5000)[0] is images


# ----------------------------------------------------------------------------
# BatchIterator


def _collect(it, epoch, start_step=0):
  return list(it.epoch(epoch, start_step))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(a[key], b[key])


def test_batches_reproducible_and_resumable():
  images, _ = _random_images(1000)
  labels = np.arange(1000)  # label = example id, to check coverage
  make = lambda: data.BatchIterator(images, labels, 64, seed=5, train=True, cutout=16)
  it = make()
  assert it.steps_per_epoch == 15  # 1000 // 64, remainder dropped
  full = _collect(it, 2)
  _assert_same(full, _collect(make(), 2))
  _assert_same(full[6:], _collect(make(), 2, start_step=6))
  batch = full[0]
  assert batch['image'].shape == (64, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32 and batch['mask'].all()
  assert not np.array_equal(full[0]['label'], _collect(make(), 3)[0]['label'])  # reshuffled
  # Every example appears at most once per epoch (40 dropped).
  assert len(set(np.concatenate([b['label'] for b in full]).tolist())) == 960


def test_processes_union_is_the_global_batch():
  images, labels = _random_images(500)
  for train in (True, False):
    kwargs = dict(seed=1, train=train, cutout=8, prefetch=0)
    single = _collect(data.BatchIterator(images, labels, 96, **kwargs), 1)
    parts = [_collect(data.BatchIterator(images, labels, 96, process_index=p, process_count=2,
                                         **kwargs), 1) for p in range(2)]
    merged = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)]
    assert parts[0][0]['image'].shape == (48, 32, 32, 3)
    _assert_same(single, merged)
  with pytest.raises(ValueError, match='multiple of process_count'):
    data.BatchIterator(images, labels, 95, seed=0, train=True, process_count=2)


def test_eval_batches_pad_and_mask():
  images, labels = _random_images(1000)
  it = data.BatchIterator(images, labels, 96, seed=0, train=False)
  batches = _collect(it, 0)
  assert it.steps_per_epoch == len(batches) == 11  # 10 full + 40 real rows
  last = batches[-1]
  assert last['image'].shape == (96, 32, 32, 3)
  np.testing.assert_array_equal(last['mask'], np.arange(96) < 40)
  assert not last['image'][40:].any() and not last['label'][40:].any()
  # Fixed order, no augmentation: exactly the normalised inputs.
  np.testing.assert_allclose(last['image'][:40], data.normalize(images[960:]), atol=1e-6)
  np.testing.assert_array_equal(last['label'][:40], labels[960:])
  assert sum(b['mask'].sum() for b in batches) == 1000


def test_eval_normalisation_of_test_set(cifar):
  arrays, _ = cifar
  it = data.BatchIterator(arrays['test_images'], arrays['test_labels'], 2048, seed=0, train=False)
  total, total_sq, count = 0.0, 0.0, 0
  for batch in it.epoch(0):
    x = batch['image'][batch['mask']].reshape(-1, 3).astype(np.float64)
    total, total_sq, count = total + x.sum(0), total_sq + (x ** 2).sum(0), count + len(x)
  mean = total / count
  std = np.sqrt(total_sq / count - mean ** 2)
  # CIFAR_MEAN/STD are train statistics; the test set differs by ~0.015 std.
  np.testing.assert_allclose(mean, 0.0, atol=0.03)
  np.testing.assert_allclose(std, 1.0, atol=0.03)


def test_crop_flip_hand_computed():
  image = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
  out = data.crop_flip(np.concatenate([image, image]), np.array([[0, 0], [2, 1]]),
                       np.array([False, True]), pad=1)
  np.testing.assert_array_equal(out[0, ..., 0], [[0, 0, 0, 0],
                                                 [0, 0, 1, 2],
                                                 [0, 4, 5, 6],
                                                 [0, 8, 9, 10]])
  np.testing.assert_array_equal(out[1, ..., 0], [[7, 6, 5, 4],
                                                 [11, 10, 9, 8],
                                                 [15, 14, 13, 12],
                                                 [0, 0, 0, 0]])


def test_train_batches_are_crops_and_flips():
  images, labels = _random_images(32)
  batch = next(data.BatchIterator(images, labels, 32, seed=2, train=True).epoch(0))
  # Each output is exactly one of the 9 x 9 x 2 crop/flip candidates of one input.
  candidates = {}
  for oy in range(9):
    for ox in range(9):
      for flip in (False, True):
        crops = data.crop_flip(images, np.full((32, 2), [oy, ox]), np.full(32, flip))
        cands = data.normalize(crops)
        for i, cand in enumerate(cands):
          candidates.setdefault(cand.tobytes(), []).append((i, oy, ox, flip))
  params = []
  for out in batch['image']:
    [match] = candidates[out.tobytes()]
    params.append(match)
  index, oy, ox, flip = map(np.array, zip(*params))
  assert sorted(index) == list(range(32))  # a permutation of the inputs
  np.testing.assert_array_equal(batch['label'], labels[index])
  assert 0 < flip.sum() < 32 and len(set(oy)) > 3 and len(set(ox)) > 3


def test_cutout_square():
  square = data.cutout_square(np.array([[16, 16], [0, 31]]), 16, 32, 32)
  assert square[0].sum() == 256 and square[0, 8:24, 8:24].all()
  assert square[1].sum() == 8 * 9 and square[1, :8, 23:].all()  # clipped at the corner


def test_cutout_zeros_a_square_after_normalisation():
  images = np.full((64, 32, 32, 3), 100, np.uint8)
  batch = next(data.BatchIterator(images, np.zeros(64), 64, seed=0, train=True,
                                  cutout=16).epoch(0))
  allowed = [data.normalize(np.full((1, 3), v, np.uint8))[0] for v in (100, 0)]  # image, padding
  sides = []
  for out in batch['image']:
    zero = (out == 0).all(-1)
    rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
    # The zeros fill one rectangle: the (clipped) cutout square.
    assert zero.sum() == len(rows) * len(cols)
    assert (len(rows), len(cols)) == (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16
    rest = out[~zero]
    assert np.all(np.isclose(rest, allowed[0]).all(-1) | np.isclose(rest, allowed[1]).all(-1))
    sides.append((len(rows), len(cols)))
  assert (16, 16) in sides  # unclipped squares have side 16


def test_early_break_stops_the_worker():
  images, labels = _random_images(512)
  before = threading.active_count()
  it = data.BatchIterator(images, labels, 64, seed=0, train=True)
  for _ in it.epoch(0):
    break
  assert threading.active_count() == before


# ----------------------------------------------------------------------------
# ImageNet


def test_imagenet_mock(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  write_imagenet_metadata(tmp_path, 10)
  with tfds.testing.mock_data(num_examples=10, data_dir=str(tmp_path)):
    train, evaluate, num_train, num_eval = data.imagenet_datasets(
        str(tmp_path / 'unused'), 4, seed=0)
    assert (num_train, num_eval) == (10, 10)
    train_batches = list(train(0))
    eval_batches = list(evaluate(0))
    resumed = list(train(0, start_step=1))  # a mid-epoch resume: the same second batch
  assert len(train_batches) == 2  # 10 // 4
  assert len(resumed) == 1
  for key in ('image', 'label'):
    np.testing.assert_array_equal(resumed[0][key], train_batches[1][key])
  # The mock serves all 10 examples: 2 full eval batches + 2 real rows, padded.
  assert len(eval_batches) == 3
  np.testing.assert_array_equal(eval_batches[-1]['mask'], [True, True, False, False])
  for batch in (train_batches[0], eval_batches[0]):
    assert batch['image'].shape == (4, 224, 224, 3) and batch['image'].dtype == np.float32
    assert np.isfinite(batch['image']).all() and batch['mask'].all()
    assert batch['label'].dtype == np.int32
    assert 0.3 < batch['image'].std() < 3  # normalised, not raw pixels


def test_imagenet_absent(tmp_path):
  with pytest.raises(data.DataError) as err:
    data.imagenet_datasets(str(tmp_path), 8, seed=0)
  message = str(err.value)
  assert '\n' not in message and '--tfds_data_dir' in message
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
  assert 'ILSVRC2012_img_train.tar' in message and 'ILSVRC2012_img_val.tar' in message


def test_crop_pad_scales_with_the_image():
  """App. G.1's pad 4 at 32x32; the same relative shift on downsampled images."""
  assert [data.crop_pad(h) for h in (32, 24, 16, 8, 4)] == [4, 3, 2, 1, 1]


def test_search_runs_on_tfds_cifar10_without_a_local_copy(tmp_path, capsys, no_local_copy):
  """The default --data_dir=auto with no npz copy anywhere: the search reads
  tensorflow-datasets (here its mock) and says so first."""
  tfds = pytest.importorskip('tensorflow_datasets')
  from snas_jax import search
  write_tfds_metadata('cifar10', tmp_path / 'tfds', {'train': 128, 'test': 64})
  cfg = search.SearchConfig(  # conftest.TINY_SEARCH
      tfds_data_dir=str(tmp_path / 'tfds'), channels=4, layers=3, image_size=8,
      num_train_images=128, num_eval_images=64, num_test_images=64, batch_size=32,
      eval_batch_size=64, epochs=2, checkpoint_every_steps=2, resource_eta=1e-3,
      backend='reference', stop_after_step=2)
  assert cfg.data_dir == 'auto'
  with tfds.testing.mock_data(num_examples=128, data_dir=str(tmp_path / 'tfds')):
    search.run(cfg, str(tmp_path / 'work'))
  out = capsys.readouterr().out
  assert out.startswith('CIFAR-10: tensorflow-datasets, prepared in ' + str(tmp_path / 'tfds'))
  assert (tmp_path / 'work' / 'checkpoints' / '2').is_dir()  # two steps ran and were saved


def test_cifar100_comes_from_tfds(tmp_path, monkeypatch):
  """CIFAR-100 is read through tensorflow-datasets whatever the npz copies,
  and normalised with its own statistics."""
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setenv(data.DATA_DIR_ENV, CIFAR_DIR)  # a CIFAR-10 copy: not used for CIFAR-100
  assert data.resolve_cifar('auto', 'cifar100') == (None, 'cifar100 comes from tensorflow-datasets')
  with pytest.raises(data.DataError, match='names an npz copy of CIFAR-10') as err:
    data.resolve_cifar(CIFAR_DIR, 'cifar100')
  assert '\n' not in str(err.value)
  write_tfds_metadata('cifar100', tmp_path, {'train': 16, 'test': 8})
  lines = []
  with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path)):
    arrays = data.load_cifar('auto', tfds_data_dir=str(tmp_path), log=lines.append,
                             dataset='cifar100')
  assert lines[0].startswith('CIFAR-100: tensorflow-datasets, prepared in ')
  assert arrays['train_images'].shape == (16, 32, 32, 3) and arrays['train_labels'].max() < 100
  images = np.full((8, 4, 4, 3), 128, np.uint8)
  batch = next(iter(data.BatchIterator(images, np.zeros(8), 8, seed=0, train=False,
                                       dataset='cifar100').epoch(0)))
  mean, std = data.CIFAR_STATS['cifar100']
  np.testing.assert_allclose(batch['image'][0, 0, 0], (128 / 255 - np.array(mean)) / np.array(std),
                             rtol=1e-5)
