"""Tests for tff_fad.learning.models."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad  # pylint: disable=unused-import  # Stops leaked TFF workers.
from tff_fad.learning import models


def test_lenet_has_bafffles_26730_parameters():
  net = models.lenet()
  conv1 = 5 * 5 * 1 * 16 + 16
  conv2 = 5 * 5 * 16 * 64 + 64
  dense = 64 * 10 + 10
  assert (conv1, conv2, dense) == (416, 25_664, 650)
  assert net.num_params == conv1 + conv2 + dense == 26_730
  assert sum(p.size for p in net.init(0)) == 26_730
  # GroupNorm adds a scale and a shift per channel.
  assert models.lenet(group_norm_groups=4).num_params == 26_730 + 2 * (16 + 64)


def test_wrn_10_2_parameter_count():
  net = models.wide_resnet(10, 2)
  stem = 3 * 3 * 1 * 16
  block = lambda ci, co: (2 * ci + 9 * ci * co + 2 * co + 9 * co * co +
                          ci * co)  # norms, convs, 1x1 projection.
  blocks = block(16, 32) + block(32, 64) + block(64, 128)
  head = 2 * 128 + 128 * 10 + 10
  assert net.num_params == stem + blocks + head == 303_418


@pytest.mark.parametrize('net, size', [
    (models.lenet(), 32), (models.lenet(), 28),
    (models.lenet(group_norm_groups=4), 32), (models.wide_resnet(), 32)])
def test_apply_shapes_and_determinism(net, size):
  params = [tf.constant(p) for p in net.init(3)]
  x = tf.random.stateless_uniform([2, size, size, 1], [1, 2])
  logits = net.apply(params, x)
  assert logits.shape == (2, 10)
  assert np.isfinite(logits.numpy()).all()
  for a, b in zip(net.init(3), net.init(3)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(net.init(3)[0], net.init(4)[0])


def test_pytorch_style_init_bounds():
  net = models.lenet()
  conv1_kernel = net.init(0)[0]
  bound = 1 / np.sqrt(25)  # fan_in = 5 * 5 * 1.
  assert np.abs(conv1_kernel).max() <= bound
  assert np.abs(conv1_kernel).max() > 0.9 * bound


def test_hardswish_values():
  x = tf.constant([-4.0, -3.0, -1.0, 0.0, 1.0, 3.0, 5.0])
  expected = [0.0, 0.0, -1 / 3, 0.0, 2 / 3, 3.0, 5.0]
  np.testing.assert_allclose(models.hardswish(x).numpy(), expected, rtol=1e-6)


def test_functional_model_runs_in_tff():
  net = models.lenet()
  model = models.to_functional_model(net, (32, 32, 1))
  assert isinstance(model, tff.learning.models.FunctionalModel)
  batch = collections.OrderedDict(
      x=np.zeros([4, 32, 32, 1], np.float32), y=np.arange(4, dtype=np.int32))
  output = model.predict_on_batch(model.initial_weights, batch['x'], False)
  assert output.shape == (4, 10)
  state = model.update_metrics_state(model.initialize_metrics_state(),
                                     batch['y'], output)
  metrics = model.finalize_metrics(state)
  assert metrics['num_examples'] == 4
  np.testing.assert_allclose(
      metrics['loss'], models.sparse_softmax_loss(output, batch['y']),
      rtol=1e-6)


def test_get_net_and_linear_model():
  assert models.get_net('lenet', (32, 32, 1)).num_params == 26_730
  net = models.get_net('linear', (8, 8, 1))
  assert net.num_params == (64 + 1) * 10
  assert net.apply([tf.constant(p) for p in net.init(0)],
                   tf.zeros([3, 8, 8, 1])).shape == (3, 10)
  with pytest.raises(ValueError, match='model'):
    models.get_net('resnet50', (32, 32, 1))


@pytest.mark.parametrize('net', [
    models.lenet(), models.lenet(group_norm_groups=4),
    models.lenet(activation='relu'), models.wide_resnet(),
    models.wide_resnet(activation='relu'), models.linear((32, 32, 1))],
                         ids=['lenet', 'lenet_group_norm', 'lenet_relu', 'wrn',
                              'wrn_relu', 'linear'])
@pytest.mark.parametrize('num_sets', [1, 3])
def test_apply_stacked_matches_apply_per_set(net, num_sets):
  sets = [[tf.constant(p) for p in net.init(seed)] for seed in range(num_sets)]
  stacked = [tf.stack(ps) for ps in zip(*sets)]
  x = tf.random.stateless_uniform([4, 32, 32, 1], [1, 2])
  logits = models.stacked_logits(net, stacked, x)
  assert logits.shape == (num_sets, 4, 10)
  for i, params in enumerate(sets):
    np.testing.assert_allclose(logits[i].numpy(), net.apply(params, x).numpy(),
                               rtol=1e-5, atol=1e-5)
  # The model TFF sees predicts the same, stacked.
  model = models.to_functional_model(net, (32, 32, 1))
  np.testing.assert_allclose(
      model.predict_on_stacked_batch((stacked, ()), x).numpy(),
      logits.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', ['lenet', 'wrn'])
def test_activation_is_the_one_asked_for(name):
  hardswish = models.get_net(name, (32, 32, 1))
  relu = models.get_net(name, (32, 32, 1), activation='relu')
  assert [s.shape for s in relu.param_specs] == [
      s.shape for s in hardswish.param_specs]
  params = [tf.constant(p) for p in hardswish.init(0)]
  x = tf.random.stateless_uniform([2, 32, 32, 1], [3, 4])
  # Same weights, different activation: different logits.
  assert not np.allclose(hardswish.apply(params, x), relu.apply(params, x))
  with pytest.raises(ValueError, match="activation must be one of.*'gelu'"):
    models.get_net(name, (32, 32, 1), activation='gelu')
