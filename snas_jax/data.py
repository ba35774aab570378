"""Input pipelines: CIFAR-10 / CIFAR-100 (in memory, numpy) and ImageNet (tfds + tf.data).

Every iterator yields host batches ``{'image': float32[b, H, W, 3], 'label':
int32[b], 'mask': bool[b]}`` with ``b = global_batch // process_count``; ``mask``
marks real examples in padded evaluation batches, so a jitted step sees one shape.

CIFAR-10 comes from a local folder of JPEG-packed npz files (decoded once and
cached) or from tfds; CIFAR-100 from tfds. Augmentation follows App. G.1 /
DARTS: pad 4 + random crop, random horizontal flip, per-channel
normalisation, optional cutout. Randomness is
a pure function of (seed, epoch, batch index), so any batch can be rebuilt
without producing the ones before it: resuming mid-epoch is exact.

TensorFlow is imported lazily (tfds / ImageNet only), through
``import_tensorflow``: the CIFAR path never pays its import time nor lets it
near the accelerator, and TF's start-up banners never reach the terminal.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import queue
import re
import socket
import sys
import tempfile
import threading
import urllib.parse
from typing import Callable, Iterator

import numpy as np

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# Per-channel statistics of each CIFAR training set (CIFAR-100's as AutoDL-Projects').
CIFAR_STATS = {'cifar10': (CIFAR_MEAN, CIFAR_STD),
               'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CIFAR_SPLITS = {'train': 50000, 'test': 10000}
_CROP_PAD = 4  # App. G.1: pad 4, random 32x32 crop
_CACHE_VERSION = 1  # bump when decoding changes, so stale caches are ignored
_MANUAL_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


def crop_pad(height: int) -> int:
  """App. G.1's pad of 4 at 32x32, scaled with the image (2 at 16x16): the
  same relative shift, not a 4-pixel jitter of a 16-pixel image."""
  return max(1, round(_CROP_PAD * height / 32))


class DataError(ValueError):
  """Missing / incomplete / corrupt data set; message is one line naming the flag to set."""

  def __init__(self, message: str):
    # Wrapped library errors may span lines; the contract is a single line.
    super().__init__(' '.join(str(message).split()))


def normalize(images, mean=CIFAR_MEAN, std=CIFAR_STD):
  """[..., W, 3] pixels in [0, 255] -> float32 (x / 255 - mean) / std, per channel.

  numpy arrays (any dtype; CIFAR) or float32 tf tensors (ImageNet).
  """
  std = np.asarray(std, np.float32)
  scale, offset = np.float32(1 / 255) / std, -np.asarray(mean, np.float32) / std
  if not isinstance(images, np.ndarray):
    return images * scale + offset
  # [W, 3] constants let numpy fuse the last two axes into one long inner loop;
  # broadcasting over the 3 channels alone is ~5x slower. In place: 2x faster.
  out = np.array(images, np.float32)
  out *= np.tile(scale, (out.shape[-2], 1))
  out += np.tile(offset, (out.shape[-2], 1))
  return out


# ----------------------------------------------------------------------------
# CIFAR-10 loading.


# Where CIFAR-10 comes from when --data_dir=auto: an npz copy named by this
# environment variable, else the one beside the repository's checkouts, else tfds.
DATA_DIR_ENV = 'SNAS_JAX_DATA_DIR'
AUTO = 'auto'
# The --data_dir flag's help, for the search and retraining alike.
DATA_DIR_HELP = ('CIFAR-10: folder with train.npz / test.npz, read in place. auto: '
                 '$SNAS_JAX_DATA_DIR, else ../shared/data/cifar10 beside the repository, else '
                 'tensorflow-datasets (downloaded on first use). Empty: tensorflow-datasets.')
_NO_DATA = ('pass --data_dir=<folder with train.npz, test.npz> (or set $SNAS_JAX_DATA_DIR), or '
            'run with a network so that tensorflow-datasets can download it')


def repository_cifar_dir() -> str | None:
  """../shared/data/cifar10 beside the source checkout this package runs
  from; None for an installed package (no checkout around it)."""
  repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.isfile(os.path.join(repository, 'setup.cfg')):
    return None
  return os.path.normpath(os.path.join(repository, '..', 'shared', 'data', 'cifar10'))


def resolve_cifar(data_dir: str | None, dataset: str = 'cifar10') -> tuple[str | None, str]:
  """(the npz folder to read, or None for tfds; why that source).

  data_dir: a folder; None or '' for tfds; 'auto' for $SNAS_JAX_DATA_DIR, then
  the repository's ../shared/data/cifar10, then tfds. The npz copies hold
  CIFAR-10: CIFAR-100 always comes from tfds.
  """
  if dataset not in CIFAR_STATS:
    raise DataError(f'--dataset={dataset!r} is not a CIFAR set; use one of {", ".join(CIFAR_STATS)}')
  if dataset != 'cifar10':
    if data_dir and data_dir != AUTO:
      raise DataError(f'--data_dir={data_dir} names an npz copy of CIFAR-10, but {dataset} is '
                      f'read through tensorflow-datasets: drop --data_dir (or pass --data_dir=)')
    return None, f'{dataset} comes from tensorflow-datasets'
  if data_dir != AUTO:
    return (data_dir or None), ('--data_dir' if data_dir else 'asked for by --data_dir=')
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    if not os.path.isfile(os.path.join(env, 'train.npz')):
      raise DataError(f'${DATA_DIR_ENV}={env} is not a folder with train.npz, test.npz; point it '
                      f'at a CIFAR-10 copy or unset it')
    return env, f'${DATA_DIR_ENV}'
  beside = repository_cifar_dir()
  if beside and os.path.isfile(os.path.join(beside, 'train.npz')):
    return beside, 'the folder beside the repository'
  return None, (f'${DATA_DIR_ENV} unset and no copy at {beside}' if beside
                else f'${DATA_DIR_ENV} unset')


def load_cifar(data_dir: str | None = AUTO, tfds_data_dir: str | None = None,
               cache_dir: str | None = None, log: Callable[[str], None] | None = None,
               dataset: str = 'cifar10') -> dict:
  """CIFAR-10 or CIFAR-100 as uint8 arrays.

  Returns {'train_images': uint8[50000,32,32,3], 'train_labels': int32[50000],
  'test_images': uint8[10000,32,32,3], 'test_labels': int32[10000]}.
  data_dir: folder with train.npz / test.npz (+ MANIFEST.json), read in place;
  decoded arrays are cached in cache_dir (default ~/.cache/snas_jax) keyed by the
  npz SHA-256. None or '': tfds, downloaded and prepared into tfds_data_dir on
  first use. 'auto': see ``resolve_cifar``. ``log`` gets one line saying which
  source is read, and where.
  """
  folder, why = resolve_cifar(data_dir, dataset)
  if folder is None:
    return _load_cifar_tfds(dataset, tfds_data_dir, why, log)
  if log:
    log(f'CIFAR-10: npz copy in {os.path.abspath(folder)} ({why})')
  return _load_cifar10_npz(folder, cache_dir)


def _load_cifar10_npz(data_dir: str, cache_dir: str | None) -> dict:
  cache_dir = os.path.expanduser(cache_dir or os.path.join('~', '.cache', 'snas_jax'))
  if not os.path.isdir(data_dir):
    raise DataError(f'CIFAR-10 folder {data_dir} does not exist; pass --data_dir=<folder with '
                    f'train.npz, test.npz>, or --data_dir=auto to find a copy or download one')
  manifest = _read_manifest(data_dir)  # {split: {'images': n, 'sha256': hex}}
  shas = {}
  for split in _CIFAR_SPLITS:
    path = os.path.join(data_dir, f'{split}.npz')
    if not os.path.isfile(path):
      raise DataError(f'{path} is missing; pass --data_dir=<folder with train.npz, test.npz>')
    shas[split] = _file_sha256(path, cache_dir)
    expected = manifest.get(split, {}).get('sha256')
    if expected and expected != shas[split]:
      raise DataError(f'{path} has SHA-256 {shas[split][:12]}..., MANIFEST.json says '
                      f'{expected[:12]}...: the file is corrupt; pass --data_dir=<an intact copy>')

  cache = os.path.join(cache_dir, f'cifar10_v{_CACHE_VERSION}_'
                       f'{shas["train"][:16]}_{shas["test"][:16]}.npz')
  if os.path.isfile(cache):
    try:
      with np.load(cache) as z:
        return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
      pass  # unreadable cache (e.g. disk trouble): decode again and overwrite it
  out = {}
  for split, count in _CIFAR_SPLITS.items():
    path = os.path.join(data_dir, f'{split}.npz')
    count = manifest.get(split, {}).get('images', count)
    out[f'{split}_images'], out[f'{split}_labels'] = _decode_npz(path, count)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f'{cache}.{os.getpid()}.tmp.npz'
  np.savez(tmp, **out)  # uncompressed: loading 180 MB takes a fraction of a second
  os.replace(tmp, cache)  # atomic, so a crash never leaves a half-written cache
  return out


def _read_manifest(data_dir: str) -> dict:
  path = os.path.join(data_dir, 'MANIFEST.json')
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      manifest = json.load(f)
    if not all(isinstance(manifest.get(s, {}), dict) for s in _CIFAR_SPLITS):
      raise ValueError('expected {"train": {...}, "test": {...}}')
    return manifest
  except (OSError, ValueError, AttributeError) as e:
    raise DataError(f'{path} is unreadable ({e}); pass --data_dir=<an intact copy>') from None


def _file_sha256(path: str, cache_dir: str) -> str:
  """SHA-256 of a file, remembered in cache_dir/sha256.json per (path, size, mtime)."""
  stat = os.stat(path)
  key = os.path.realpath(path)
  stamp = [stat.st_size, stat.st_mtime_ns]
  index_path = os.path.join(cache_dir, 'sha256.json')
  try:
    with open(index_path) as f:
      index = json.load(f)
  except (OSError, ValueError):
    index = {}
  entry = index.get(key)
  if entry and entry[:2] == stamp:
    return entry[2]
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 24), b''):
      digest.update(block)
  index[key] = stamp + [digest.hexdigest()]
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f'{index_path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(index, f)
  os.replace(tmp, index_path)
  return digest.hexdigest()


def _decode_npz(path: str, count: int) -> tuple[np.ndarray, np.ndarray]:
  """One JPEG-packed npz -> (uint8[count,32,32,3], int32[count])."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  fix = 'pass --data_dir=<an intact copy of the CIFAR-10 folder>'
  try:
    with np.load(path, allow_pickle=False) as z:
      jpeg, offsets, labels = z['jpeg'], z['offsets'], z['labels']
  except Exception as e:  # zipfile / format / missing-key errors all mean "corrupt"
    raise DataError(
        f'{path} is not a readable CIFAR npz ({type(e).__name__}: {e}); {fix}') from None
  if len(labels) != count or len(offsets) != count + 1:
    raise DataError(f'{path} holds {len(labels)} labels and {len(offsets) - 1} images, '
                    f'expected {count}; {fix}')
  if offsets[0] != 0 or offsets[-1] != len(jpeg) or np.any(np.diff(offsets) <= 0):
    raise DataError(f'{path} has inconsistent JPEG offsets; {fix}')
  if labels.size and labels.max() >= 10:
    raise DataError(f'{path} has labels outside 0..9; {fix}')
  buf, offsets = jpeg.tobytes(), offsets.tolist()  # Python ints: faster slicing
  images = np.empty((count, 32, 32, 3), np.uint8)

  def decode(lo_hi):
    # Pillow: libjpeg's accurate integer IDCT (TF's default fast IDCT differs by
    # a few levels). Mostly Python per image, so extra threads gain a little.
    for i in range(*lo_hi):
      try:
        with Image.open(io.BytesIO(buf[offsets[i]:offsets[i + 1]]), formats=['JPEG']) as im:
          images[i] = np.asarray(im.convert('RGB'))
      except Exception as e:  # PIL raises several types for broken files
        raise DataError(f'{path}: image {i} is not a valid 32x32 JPEG ({e}); {fix}') from None

  chunks = [(lo, min(lo + 2048, count)) for lo in range(0, count, 2048)]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    list(pool.map(decode, chunks))
  return images, labels.astype(np.int32)


def _load_cifar_tfds(dataset: str, tfds_data_dir: str | None, why: str,
                     log: Callable[[str], None] | None) -> dict:
  """CIFAR-10 / CIFAR-100 from tfds, downloaded and prepared on first use."""
  _, tfds = _import_tf()
  builder = tfds.builder(dataset, data_dir=tfds_data_dir)
  name = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100'}[dataset]
  if not builder.is_prepared():
    if log:
      log(f'{name}: tensorflow-datasets, downloading into {builder.data_dir} ({why})')
    # tfds retries an unreachable host for minutes: ask once, quickly.
    host = urllib.parse.urlparse(builder.info.homepage).hostname  # the download's host too
    if not _reachable(host):
      raise DataError(f'{name} is not prepared in {builder.data_dir} and {host} cannot be '
                      f'reached to download it ({why}); {_NO_DATA}')
    try:
      builder.download_and_prepare()
    except Exception as e:  # network, disk and archive errors alike: nothing to resume
      raise DataError(f'tensorflow-datasets could not download and prepare {name} into '
                      f'{builder.data_dir} ({type(e).__name__}: {e}); {_NO_DATA}') from None
  elif log:
    log(f'{name}: tensorflow-datasets, prepared in {builder.data_dir} ({why})')
  out = {}
  for split in _CIFAR_SPLITS:
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    out[f'{split}_images'] = data['image'].astype(np.uint8)
    out[f'{split}_labels'] = data['label'].astype(np.int32)
  return out


def _reachable(host: str, timeout: float = 10.0) -> bool:
  """Whether a TCP connection to ``host``'s HTTPS port opens within ``timeout`` seconds."""
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


# ----------------------------------------------------------------------------
# Splits.


def split_train(images, labels, num_heldout: int, seed: int = 0):
  """Seeded held-out split of the training set (model selection without test).

  Returns ((train_images, train_labels), (heldout_images, heldout_labels)), both
  in a seeded random order.
  """
  if not 0 <= num_heldout < len(labels):
    raise ValueError(f'num_heldout={num_heldout} must be in [0, {len(labels)})')
  perm = np.random.default_rng(seed).permutation(len(labels))
  held, kept = perm[:num_heldout], perm[num_heldout:]
  return (images[kept], labels[kept]), (images[held], labels[held])


def subset(images, labels, num: int, seed: int = 0):
  """Seeded, class-balanced subset of ``num`` examples (num <= 0 or >= len: all).

  Classes are drawn round-robin (random order within each class), so every class
  gets num // num_classes examples or one more while it has examples left.
  """
  n = len(labels)
  if num <= 0 or num >= n:
    return images, labels
  perm = np.random.default_rng(seed).permutation(n)
  shuffled = np.asarray(labels)[perm]
  by_class = np.argsort(shuffled, kind='stable')  # grouped by class, random within
  sorted_labels = shuffled[by_class]
  rank = np.empty(n, np.int64)  # position of each example within its class
  rank[by_class] = np.arange(n) - np.searchsorted(sorted_labels, sorted_labels)
  pick = perm[np.argsort(rank, kind='stable')[:num]]
  return images[pick], labels[pick]


# ----------------------------------------------------------------------------
# CIFAR batches.


def crop_flip(images: np.ndarray, offsets: np.ndarray, flip: np.ndarray, pad: int = 4):
  """Zero-pad by ``pad``, crop back to [H, W] at ``offsets``, mirror where ``flip``.

  images: uint8[n, H, W, C]; offsets: int[n, 2] (row, col) in [0, 2*pad];
  flip: bool[n]. Returns uint8[n, H, W, C].
  """
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(images)
  # A loop of slice copies is ~3x faster than one fancy-index gather.
  for i, ((y, x), mirror) in enumerate(zip(offsets.tolist(), flip.tolist())):
    window = padded[i, y:y + h, x:x + w]
    out[i] = window[:, ::-1] if mirror else window
  return out


def cutout_square(centres: np.ndarray, size: int, h: int, w: int) -> np.ndarray:
  """bool[n, h, w]: True inside the size x size square centred at centres (int[n, 2]), clipped."""
  lo = centres - size // 2
  ys, xs = np.arange(h), np.arange(w)
  inside_y = (ys >= lo[:, :1]) & (ys < lo[:, :1] + size)
  inside_x = (xs >= lo[:, 1:]) & (xs < lo[:, 1:] + size)
  return inside_y[:, :, None] & inside_x[:, None, :]


class BatchIterator:
  """Global-batch iterator over in-memory uint8 images with App. G.1 augmentation.

  images: uint8[N, H, W, 3]; labels: int[N]. Batches are global batches cut into
  process_count row blocks; this process yields block process_index, so the
  union over processes is exactly what one process would see.

  Why numpy on a background thread rather than tf.data: on a 2-core CPU it
  augments an epoch (crop + flip + normalise + cutout) 2-3x faster than
  tf.data with one vectorised map per batch and 20-30x faster than a
  per-example map, numpy releases the GIL so the work hides behind a jitted
  step, and it keeps TF out of the process.
  """

  def __init__(self, images, labels, global_batch: int, *, seed: int, train: bool,
               cutout: int = 0, process_index: int = 0, process_count: int = 1,
               drop_remainder: bool | None = None, prefetch: int = 2,
               dataset: str = 'cifar10'):
    """drop_remainder None: True for train, False (pad + mask) for eval;
    dataset: whose statistics normalise the images (CIFAR_STATS)."""
    if global_batch <= 0 or global_batch % process_count:
      raise ValueError(f'global_batch={global_batch} must be a positive multiple of '
                       f'process_count={process_count}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in [0, {process_count})')
    if len(images) != len(labels):
      raise ValueError(f'{len(images)} images but {len(labels)} labels')
    if seed < 0:
      raise ValueError(f'seed={seed} must be >= 0')
    self.images = np.asarray(images, np.uint8)
    self.labels = np.asarray(labels, np.int32)
    self.global_batch, self.seed, self.train, self.cutout = global_batch, seed, train, cutout
    self.drop_remainder = train if drop_remainder is None else drop_remainder
    self.prefetch = prefetch
    self.mean, self.std = CIFAR_STATS[dataset]
    self.local_batch = global_batch // process_count
    self._rows = slice(process_index * self.local_batch, (process_index + 1) * self.local_batch)
    if self.steps_per_epoch == 0:
      raise ValueError(f'global_batch={global_batch} exceeds the {len(labels)} examples '
                       f'and drop_remainder is set: an epoch would have no batch')

  @property
  def steps_per_epoch(self) -> int:
    n, g = len(self.labels), self.global_batch
    return n // g if self.drop_remainder else -(-n // g)

  def _order(self, epoch: int) -> np.ndarray:
    if not self.train:
      return np.arange(len(self.labels))
    # Distinct first words keep the permutation and batch streams independent.
    return np.random.default_rng([0, self.seed, epoch]).permutation(len(self.labels))

  def batch(self, epoch: int, step: int, order: np.ndarray | None = None) -> dict:
    """This process's rows of global batch ``step`` of ``epoch`` (pure function)."""
    order = self._order(epoch) if order is None else order
    g = self.global_batch
    idx = order[step * g:(step + 1) * g]
    mask = np.arange(g) < len(idx)
    idx = np.pad(idx, (0, g - len(idx)))  # padded rows read example 0, masked out below
    if self.train:
      # Draw for the whole global batch, then slice: every process sees the
      # same draws, and the crops don't depend on whether cutout is on.
      rng = np.random.default_rng([1, self.seed, epoch, step])
      h, w = self.images.shape[1:3]
      pad = crop_pad(h)
      offsets = rng.integers(0, 2 * pad + 1, size=(g, 2))
      flip = rng.random(g) < 0.5
      centres = rng.integers(0, [h, w], size=(g, 2))
    idx, mask = idx[self._rows], mask[self._rows]
    images = self.images[idx]
    if self.train:
      images = normalize(crop_flip(images, offsets[self._rows], flip[self._rows], pad),
                         self.mean, self.std)
      if self.cutout > 0:  # zeros after normalisation, as the DARTS/SNAS reference does
        images[cutout_square(centres[self._rows], self.cutout, h, w)] = 0.0
    else:
      images = normalize(images, self.mean, self.std)
    images[~mask] = 0.0
    return {'image': images, 'label': np.where(mask, self.labels[idx], 0).astype(np.int32),
            'mask': mask}

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """Batches start_step.. of ``epoch``; skipped batches are never computed."""
    order = self._order(epoch)
    jobs = (lambda s=s: self.batch(epoch, s, order)
            for s in range(start_step, self.steps_per_epoch))
    if self.prefetch <= 0:
      return (job() for job in jobs)
    return _background(jobs, self.prefetch)


_END = object()


def _background(jobs: Iterator[Callable[[], dict]], size: int) -> Iterator[dict]:
  """Runs ``jobs`` on a thread, ``size`` results ahead; numpy releases the GIL."""
  results = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        results.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for job in jobs:
        if not put(job()):
          return
      put(_END)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      put(_Failure(e))

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while (item := results.get()) is not _END:
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:  # consumer stopped early (break / exception / garbage collection)
    stop.set()
    thread.join()


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


# ----------------------------------------------------------------------------
# ImageNet.


# What TensorFlow's C++ runtime prints on stderr while it loads, before its
# logging is set up: absl's "All log messages before absl::InitializeLog()"
# notice, INFO records (the oneDNN notice, once per TF library that carries it,
# and the CPU-feature notice) and the feature notice's second line. These
# records ignore TF_CPP_MIN_LOG_LEVEL, so they are filtered out of stderr.
_TF_BANNER = re.compile(
    rb'^(WARNING: All log messages before absl::InitializeLog\(\) is called'
    rb'|I\d{4} \d\d:\d\d:\d\d'
    rb'|To enable the following instructions:)')


def import_tensorflow(with_datasets: bool = False):
  """``tensorflow`` (and ``tensorflow_datasets``) without TF's start-up banners.

  The package loads TF only through here. TF's C++ libraries print their
  banners while they load, whatever TF_CPP_MIN_LOG_LEVEL says, so file
  descriptor 2 is captured during the import and every line but the banners
  (``_TF_BANNER``) is written back: a warning or an error still reaches the
  terminal. TF_CPP_MIN_LOG_LEVEL=1 is set too, unless the user set it, for
  TF's later logging. Only logging changes: oneDNN stays on, so tf.data
  computes exactly what it would without this. TF is also kept off the GPUs
  that JAX owns.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  if 'tensorflow' in sys.modules and (not with_datasets or 'tensorflow_datasets' in sys.modules):
    return _tf_modules(with_datasets)
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no file descriptor 2 to capture: import as it is
    return _tf_modules(with_datasets)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      return _tf_modules(with_datasets)
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = b''.join(line for line in captured.read().splitlines(keepends=True)
                      if not _TF_BANNER.match(line))
      while kept:
        kept = kept[os.write(2, kept):]


def _tf_modules(with_datasets: bool):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # TF's devices are already initialised in this process
    pass
  if not with_datasets:
    return tf
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tf, tfds


def _import_tf():
  """tensorflow + tfds, with TF kept off the accelerators JAX owns."""
  return import_tensorflow(with_datasets=True)


def imagenet_datasets(tfds_data_dir: str | None, global_batch: int, *, seed: int,
                      image_size: int = 224, process_index: int = 0, process_count: int = 1):
  """tfds 'imagenet2012' pipelines.

  Returns (train_factory, eval_factory, num_train, num_eval); train_factory(epoch,
  start_step=0) (batches start_step.. of the epoch: a resume skips the encoded
  records, decoding none of them) and eval_factory(epoch=0) give iterables of
  local batches {'image': float32[b, S, S, 3], 'label': int32[b], 'mask':
  bool[b]}, b = global_batch // process_count, S = image_size. Every process gets the same number of batches
  (train drops the remainder; eval pads with masked rows).
  """
  tf, tfds = _import_tf()
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'global_batch={global_batch} must be a positive multiple of '
                     f'process_count={process_count}')
  builder = tfds.builder('imagenet2012', data_dir=tfds_data_dir)
  if not builder.is_prepared():
    root = os.path.expanduser(tfds_data_dir or tfds.core.constants.DATA_DIR)
    manual = os.path.join(root, 'downloads', 'manual')
    if not all(os.path.isfile(os.path.join(manual, t)) for t in _MANUAL_TARS):
      raise DataError(f'tfds imagenet2012 is not prepared and needs a manual download: put '
                      f'{" and ".join(_MANUAL_TARS)} in {manual}/ and pass --tfds_data_dir={root}')
    # Builds the TFRecords from the tars: hours, once.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  local = global_batch // process_count
  num_train = builder.info.splits['train'].num_examples
  num_eval = builder.info.splits['validation'].num_examples
  # Equal train shards => equal step counts on every process.
  train_split = tfds.even_splits('train', process_count, drop_remainder=True)[process_index]
  eval_split = tfds.even_splits('validation', process_count)[process_index]
  train_steps = num_train // global_batch
  largest_shard = -(-num_eval // process_count)
  eval_steps = -(-largest_shard // local)
  skip = {'image': tfds.decode.SkipDecoding()}  # decode inside the crop: much less work
  mean_std = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)

  def train_example(key, index, ex):
    seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(key, index), 5)
    shape = tf.io.extract_jpeg_shape(ex['image'])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([1, 0, 4]), seed=seeds[0], min_object_covered=0.0, area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.io.decode_and_crop_jpeg(ex['image'], window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    image = _color_jitter(tf, image, seeds[2:], 0.4)
    return {'image': normalize(image, **mean_std), 'label': tf.cast(ex['label'], tf.int32),
            'mask': tf.constant(True)}

  def eval_example(ex):
    image = tf.cast(tf.io.decode_jpeg(ex['image'], channels=3), tf.float32)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    resize = round(image_size * 256 / 224)  # 256 for 224
    new_hw = tf.cast(tf.round(hw * resize / tf.reduce_min(hw)), tf.int32)
    image = tf.image.resize(image, new_hw, antialias=True)
    top, left = (new_hw[0] - image_size) // 2, (new_hw[1] - image_size) // 2
    image = image[top:top + image_size, left:left + image_size]
    image.set_shape([image_size, image_size, 3])
    return {'image': normalize(image, **mean_std), 'label': tf.cast(ex['label'], tf.int32),
            'mask': tf.constant(True)}

  def train_factory(epoch: int = 0, start_step: int = 0):
    ds = builder.as_dataset(split=train_split, decoders=skip, shuffle_files=True,
                            read_config=tfds.ReadConfig(shuffle_seed=seed + epoch))
    # On top of the file shuffle; 10k encoded JPEGs hold ~1 GB of host memory.
    ds = ds.shuffle(10_000, seed=seed + epoch).enumerate()
    # Augmentation is a function of (seed, epoch, process, element index), so
    # records skipped before decoding leave the later batches as they were.
    ds = ds.skip(start_step * local)
    key = tf.constant([seed, epoch * process_count + process_index], tf.int64)
    ds = ds.map(lambda i, ex: train_example(key, i, ex), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local, drop_remainder=True).take(max(train_steps - start_step, 0))
    return tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))

  def eval_factory(epoch: int = 0):
    del epoch  # fixed order
    ds = builder.as_dataset(split=eval_split, decoders=skip, shuffle_files=False)
    ds = ds.map(eval_example, num_parallel_calls=tf.data.AUTOTUNE)
    pad = tf.data.Dataset.from_tensors({
        'image': tf.zeros([image_size, image_size, 3]), 'label': tf.constant(0),
        'mask': tf.constant(False)}).repeat()
    # Masked padding fills the last batch and any batches this shard lacks.
    ds = ds.concatenate(pad).batch(local, drop_remainder=True).take(eval_steps)
    return tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))

  return train_factory, eval_factory, num_train, num_eval


def _color_jitter(tf, image, seeds, strength: float):
  """torchvision-style brightness, contrast, saturation factors in [1-s, 1+s].

  image: float32[H, W, 3] in [0, 255]; seeds: int[3, 2]. Fixed order, clipped
  after each step as torchvision does.
  """
  factor = lambda s: tf.random.stateless_uniform([], s, 1 - strength, 1 + strength)
  image = tf.clip_by_value(image * factor(seeds[0]), 0.0, 255.0)
  mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
  image = tf.clip_by_value((image - mean) * factor(seeds[1]) + mean, 0.0, 255.0)
  gray = tf.image.rgb_to_grayscale(image)
  return tf.clip_by_value((image - gray) * factor(seeds[2]) + gray, 0.0, 255.0)


def downsample(images: np.ndarray, size: int) -> np.ndarray:
  """uint8[n, H, W, 3] -> uint8[n, size, size, 3] by area averaging (H a
  multiple of size). A cheap proxy task: 16x16 CIFAR makes a CPU search 4x cheaper."""
  n, h, w, c = images.shape
  if size == h:
    return images
  if h % size or w % size:
    raise ValueError(f'--image_size={size} must divide the image side {h}')
  f = h // size
  pooled = images.reshape(n, size, f, size, f, c).astype(np.float32).mean((2, 4))
  return np.round(pooled).astype(np.uint8)
