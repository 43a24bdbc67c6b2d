"""Tests of tff_fad.learning.optimizers against hand-written updates."""

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_fad.learning import optimizers

_GRADIENTS = [  # Three steps of gradients for a weight of two tensors.
    (np.array([1.0, -2.0]), np.array([[0.5]])),
    (np.array([0.25, 3.0]), np.array([[-1.0]])),
    (np.array([-1.5, 0.5]), np.array([[2.0]])),
]


def _run(optimizer, steps=3):
  weights = (tf.constant([0.1, 0.2]), tf.constant([[0.3]]))
  state = optimizer.initialize(
      tuple(tf.TensorSpec(w.shape, w.dtype) for w in weights))
  for gradients in _GRADIENTS[:steps]:
    state, weights = optimizer.next(
        state, weights, tuple(tf.constant(g, tf.float32) for g in gradients))
  return [w.numpy() for w in weights], state


def _nesterov_by_hand(rates, momentum):
  weights = [np.array([0.1, 0.2]), np.array([[0.3]])]
  velocity = [np.zeros(2), np.zeros((1, 1))]
  for rate, gradients in zip(rates, _GRADIENTS):
    for i, g in enumerate(gradients):
      velocity[i] = momentum * velocity[i] + g
      weights[i] = weights[i] - rate * (g + momentum * velocity[i])
  return weights


def test_nesterov_is_the_hand_written_update_for_three_steps():
  got, state = _run(optimizers.build_nesterov_sgdm(0.1, momentum=0.9))
  for g, w in zip(got, _nesterov_by_hand([0.1] * 3, 0.9)):
    np.testing.assert_allclose(g, w, rtol=1e-6)
  assert float(state['learning_rate']) == pytest.approx(0.1)


def test_nesterov_differs_from_tffs_heavy_ball():
  nesterov, _ = _run(optimizers.build_nesterov_sgdm(0.1, momentum=0.9))
  heavy_ball, _ = _run(tff.learning.optimizers.build_sgdm(0.1, momentum=0.9))
  assert not np.allclose(nesterov[0], heavy_ball[0])


def test_nesterov_hparams_round_trip():
  optimizer = optimizers.build_nesterov_sgdm(0.1, momentum=0.9)
  state = optimizer.initialize((tf.TensorSpec([2], tf.float32),))
  hparams = optimizer.get_hparams(state)
  assert list(hparams) == ['learning_rate', 'momentum']
  hparams['learning_rate'] = 0.5
  assert optimizer.set_hparams(state, hparams)['learning_rate'] == 0.5


@pytest.mark.parametrize('decay, expected', [
    # 10 steps, 2 of warm-up: steps 0, 1 warm up; then 8 steps of decay.
    ('constant', [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ('cosine', [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 8)),
                0.5 * (1 + math.cos(math.pi * 2 / 8)), 0.0]),
    ('linear', [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 0.0]),
])
def test_schedule_warms_up_then_decays(decay, expected):
  schedule = optimizers.learning_rate_schedule(2.0, total_steps=10,
                                               decay=decay, warmup_steps=2)
  got = [float(schedule(step)) for step in (0, 1, 2, 3, 4, 10)]
  np.testing.assert_allclose(got, [2.0 * e for e in expected], atol=1e-6)
  assert float(schedule(tf.constant(3, tf.int32))) == pytest.approx(got[3])


def test_scheduled_nesterov_uses_the_rate_of_each_step():
  schedule = optimizers.learning_rate_schedule(0.1, total_steps=3,
                                               decay='linear', warmup_steps=1)
  optimizer = tff.learning.optimizers.schedule_learning_rate(
      optimizers.build_nesterov_sgdm(0.1, momentum=0.5), schedule)
  got, _ = _run(optimizer)
  rates = [0.1, 0.1, 0.05]  # Warm-up step 0 at 1/1, then 1 - 0/2, 1 - 1/2.
  for g, w in zip(got, _nesterov_by_hand(rates, 0.5)):
    np.testing.assert_allclose(g, w, rtol=1e-6)


@pytest.mark.parametrize('kwargs, message', [
    (dict(learning_rate=-1.0), 'learning_rate must be >= 0'),
    (dict(momentum=1.0), r'momentum must be in \[0, 1\)'),
])
def test_bad_nesterov_arguments_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optimizers.build_nesterov_sgdm(**kwargs)


@pytest.mark.parametrize('kwargs, message', [
    (dict(decay='step'), 'decay must be one of'),
    (dict(total_steps=0), 'total_steps must be >= 1'),
    (dict(warmup_steps=10), r'warmup_steps must be in \[0, total_steps=10\)'),
])
def test_bad_schedule_arguments_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optimizers.learning_rate_schedule(**{**dict(
        learning_rate=0.1, total_steps=10), **kwargs})
