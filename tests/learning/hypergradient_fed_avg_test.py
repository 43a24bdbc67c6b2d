"""Hypergradient FedAvg: the learned-rate derivative, its modes and costs."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad.data import digits
from tff_fad.learning import hypergradient_fed_avg as hg
from tff_fad.learning import models


@pytest.fixture(scope='module')
def setup():
  fed = digits.load_federated_digits(num_clients=6, dirichlet_alpha=1.0,
                                     seed=0, source='sklearn')
  net = models.get_net('linear', fed.image_shape)
  model = models.to_functional_model(net, fed.image_shape, seed=0)
  data = [fed.train.create_tf_dataset_for_client(c).batch(16)
          for c in fed.client_ids[:3]]
  # The greedy one-step hypergradient; `carried` below adds the carry.
  processes = {mode: hg.build_hypergradient_fed_avg(
      model, initial_server_learning_rate=0.5, mode=mode, tangent_decay=0.0)
               for mode in hg.MODES}
  return collections.namedtuple('Setup', 'net model data processes')(
      net, model, data, processes)


def _after_rounds(process, data, n):
  state = process.initialize()
  for _ in range(n):
    state = process.next(state, data).state
  return state


def test_is_a_learning_process(setup):
  process = setup.processes['forward']
  assert isinstance(process, tff.learning.templates.LearningProcess)
  state = process.initialize()
  assert state['log_lr'] == pytest.approx(np.log(0.5))
  weights = process.get_model_weights(state)
  np.testing.assert_allclose(weights.trainable[0],
                             setup.model.initial_weights[0][0])


@pytest.mark.parametrize('mode', hg.MODES)
def test_hypergradient_matches_finite_differences_of_post_update_loss(
    setup, mode):
  process = setup.processes[mode]
  state = _after_rounds(process, setup.data, 1)
  round_program = hg.build_round_program(
      setup.model, tff.learning.optimizers.build_sgdm(0.1))
  eps = 1e-2

  def post_update_loss(log_lr):
    return round_program(state['base'], np.float32(log_lr), state['pending'],
                         setup.data)[0]

  finite_difference = (post_update_loss(state['log_lr'] + eps) -
                       post_update_loss(state['log_lr'] - eps)) / (2 * eps)
  metrics = process.next(state, setup.data).metrics
  assert abs(finite_difference) > 1e-4  # A real signal, not 0 == 0.
  assert metrics['hypergradient'] == pytest.approx(finite_difference,
                                                   rel=2e-2)
  assert metrics['post_update_loss'] == pytest.approx(
      post_update_loss(state['log_lr']), rel=1e-5)


def test_forward_and_reverse_modes_agree(setup):
  state = _after_rounds(setup.processes['forward'], setup.data, 1)
  forward = setup.processes['forward'].next(state, setup.data)
  reverse = setup.processes['reverse'].next(state, setup.data)
  assert forward.metrics['hypergradient'] == pytest.approx(
      reverse.metrics['hypergradient'], rel=1e-4)
  np.testing.assert_allclose(forward.state['log_lr'], reverse.state['log_lr'],
                             rtol=1e-5)
  tf.nest.map_structure(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      forward.state['pending'], reverse.state['pending'])


@pytest.fixture(scope='module')
def carried(setup):
  """Processes that carry d(model)/d(log lr) across rounds, both modes."""
  return {mode: hg.build_hypergradient_fed_avg(
      setup.model, initial_server_learning_rate=0.5, mode=mode,
      tangent_decay=0.8) for mode in hg.MODES}


def test_base_tangent_accumulates_decayed_server_steps(setup, carried):
  process = carried['forward']
  s1 = _after_rounds(process, setup.data, 1)
  s2 = process.next(s1, setup.data).state
  s3 = process.next(s2, setup.data).state
  # Round 1 starts from no pending update, so round 2 is the first step.
  for t in s1['base_tangent']:
    np.testing.assert_array_equal(t, np.zeros_like(t))
  lr2, lr3 = np.exp(s1['log_lr']), np.exp(s2['log_lr'])
  for t2, t3, p2, p3 in zip(s2['base_tangent'], s3['base_tangent'],
                            s1['pending'], s2['pending']):
    np.testing.assert_allclose(t2, -lr2 * p2, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(t3, 0.8 * (-lr2 * p2) - lr3 * p3, rtol=1e-5,
                               atol=1e-8)
  assert np.linalg.norm(s3['base_tangent'][0]) > 0


@pytest.mark.parametrize('mode', hg.MODES)
def test_carried_hypergradient_matches_finite_differences(setup, carried,
                                                          mode):
  process = carried[mode]
  state = _after_rounds(process, setup.data, 3)
  round_program = hg.build_round_program(
      setup.model, tff.learning.optimizers.build_sgdm(0.1))
  eps = 1e-2

  def post_update_loss(shift):
    # The last rounds' steps move with the rate: base along 0.8 * tangent.
    trainable = [b + shift * 0.8 * t for b, t in zip(state['base'][0],
                                                       state['base_tangent'])]
    base = (tuple(np.float32(t) for t in trainable), state['base'][1])
    return round_program(base, np.float32(state['log_lr'] + shift),
                         state['pending'], setup.data)[0]

  finite_difference = (post_update_loss(eps) - post_update_loss(-eps)) / (
      2 * eps)
  greedy = (round_program(state['base'], np.float32(state['log_lr'] + eps),
                          state['pending'], setup.data)[0] -
            round_program(state['base'], np.float32(state['log_lr'] - eps),
                          state['pending'], setup.data)[0]) / (2 * eps)
  reported = process.next(state, setup.data).metrics['hypergradient']
  assert abs(finite_difference - greedy) > 1e-3  # The carry matters here.
  assert reported == pytest.approx(finite_difference, rel=2e-2)


def test_carried_forward_and_reverse_modes_agree(setup, carried):
  state = _after_rounds(carried['forward'], setup.data, 3)
  forward = carried['forward'].next(state, setup.data)
  reverse = carried['reverse'].next(state, setup.data)
  assert forward.metrics['hypergradient'] == pytest.approx(
      reverse.metrics['hypergradient'], rel=1e-4)
  tf.nest.map_structure(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      forward.state['base_tangent'], reverse.state['base_tangent'])


def test_the_carry_costs_no_communication(setup, carried):
  for mode in hg.MODES:
    assert tff_fad.communication_cost(carried[mode].next, 3) == (
        tff_fad.communication_cost(setup.processes[mode].next, 3))


def test_model_weights_are_base_minus_lr_times_pending(setup):
  process = setup.processes['forward']
  state = _after_rounds(process, setup.data, 1)
  lr = np.exp(state['log_lr'])
  expected = [b - lr * p for b, p in zip(state['base'][0], state['pending'])]
  tf.nest.map_structure(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
      list(process.get_model_weights(state).trainable), expected)
  assert np.linalg.norm(state['pending'][0]) > 0  # Training moved the model.


def test_learning_rate_moves_against_the_hypergradient(setup):
  process = setup.processes['forward']
  state = _after_rounds(process, setup.data, 1)
  output = process.next(state, setup.data)
  step = output.state['log_lr'] - state['log_lr']
  assert output.metrics['hypergradient'] != 0
  assert np.sign(step) == -np.sign(output.metrics['hypergradient'])


def test_communication_cost_of_the_modes(setup):
  # sklearn digits, linear model: 65 x 10 weights = 650 floats = 2,600 B.
  model_bytes = setup.net.num_params * 4
  forward = tff_fad.communication_cost(setup.processes['forward'].next, 3)
  reverse = tff_fad.communication_cost(setup.processes['reverse'].next, 3)
  # Forward: one broadcast of <w, dw>; uploads: model update + its weight
  # (4 B), <(loss, count), (dloss, dcount)> (16 B), train totals (8 B).
  assert forward.server_to_client_bytes_per_client == 2 * model_bytes
  assert forward.client_to_server_bytes_per_client == model_bytes + 28
  assert forward.round_trips == 1
  # Reverse: w, then the cotangent of (loss, count) (8 B); uploads: (loss,
  # count) (8 B), the loss gradient (model-size), the update etc. (12 B).
  assert reverse.server_to_client_bytes_per_client == model_bytes + 8
  assert reverse.client_to_server_bytes_per_client == 2 * model_bytes + 20
  assert reverse.round_trips == 2


@pytest.mark.parametrize('kwargs, message', [
    (dict(mode='sideways'), 'mode must be one of'),
    (dict(initial_server_learning_rate=0.0),
     'initial_server_learning_rate must be > 0'),
    (dict(tangent_decay=1.0), r'tangent_decay must be in \[0, 1\)'),
    (dict(tangent_decay=-0.5), r'tangent_decay must be in \[0, 1\)'),
])
def test_bad_arguments(setup, kwargs, message):
  with pytest.raises(ValueError, match=message):
    hg.build_hypergradient_fed_avg(setup.model, **kwargs)


@pytest.fixture(scope='module')
def weighting(setup):
  process = hg.build_learned_weighting_fed_avg(
      setup.model, initial_server_learning_rate=0.5, tangent_decay=0.0)
  round_program = hg.build_learned_weighting_round_program(
      setup.model, tff.learning.optimizers.build_sgdm(0.1))
  return process, round_program


def test_learned_weighting_is_a_one_round_trip_learning_process(setup,
                                                                weighting):
  process, _ = weighting
  assert isinstance(process, tff.learning.templates.LearningProcess)
  report = tff_fad.communication_cost(process.next, 3)
  model_bytes = setup.net.num_params * 4
  # The model and two tangent directions each way, plus small scalars.
  assert report.round_trips == 1
  assert 3 * model_bytes < report.server_to_client_bytes_per_client < (
      3 * model_bytes + 64)
  assert 3 * model_bytes < report.client_to_server_bytes_per_client < (
      3 * model_bytes + 64)


def test_weighting_hypergradient_matches_finite_differences(setup, weighting):
  process, round_program = weighting
  first, second = setup.data[:2], setup.data[1:]
  s0 = process.initialize()
  s1 = process.next(s0, first).state
  reported = process.next(s1, second).metrics['hyper']
  eps = 1e-2

  def loss_after_round_zero_with(exponent):
    # Round 0's update, averaged with weights n_i ** exponent ...
    (_, pending), _ = round_program(s0['base'], s0['log_lr'], s0['pending'],
                                    np.float32(exponent), first)
    # ... then the loss of round 1's clients at the updated model.
    (loss, _), _ = round_program(s1['base'], s1['log_lr'], pending,
                                 s1['exponent'], second)
    return loss

  finite_difference = (loss_after_round_zero_with(s0['exponent'] + eps) -
                       loss_after_round_zero_with(s0['exponent'] - eps)) / (
                           2 * eps)
  assert abs(finite_difference) > 1e-5
  assert reported['hypergradient_exponent'] == pytest.approx(
      finite_difference, rel=3e-2)
  assert reported['weight_exponent'] == pytest.approx(s1['exponent'])


def test_carried_weighting_hypergradients_match_finite_differences(setup):
  process = hg.build_learned_weighting_fed_avg(
      setup.model, initial_server_learning_rate=0.5, tangent_decay=0.8)
  round_program = hg.build_learned_weighting_round_program(
      setup.model, tff.learning.optimizers.build_sgdm(0.1))
  state = _after_rounds(process, setup.data, 3)
  reported = process.next(state, setup.data).metrics['hyper']
  eps = 1e-2

  def loss_along(direction, shift):
    # Direction 0 shifts log_lr, 1 the exponent (and the pending update along
    # its tangent); earlier rounds' steps move along 0.8 * base_tangent.
    trainable = tuple(np.float32(b + shift * 0.8 * t[direction]) for b, t in
                      zip(state['base'][0], state['base_tangent']))
    pending = state['pending']
    if direction == 1:
      pending = tuple(np.float32(p + shift * t) for p, t in
                      zip(state['pending'], state['pending_tangent']))
    (loss, _), _ = round_program(
        (trainable, state['base'][1]),
        np.float32(state['log_lr'] + shift * (direction == 0)), pending,
        np.float32(state['exponent'] + shift * (direction == 1)), setup.data)
    return loss

  for direction, key in enumerate(('hypergradient_log_lr',
                                   'hypergradient_exponent')):
    finite_difference = (loss_along(direction, eps) -
                         loss_along(direction, -eps)) / (2 * eps)
    assert abs(finite_difference) > 1e-5
    assert reported[key] == pytest.approx(finite_difference, rel=3e-2), key
  assert np.linalg.norm(state['base_tangent'][0][1]) > 0


@pytest.mark.parametrize('builder', ['hypergradient', 'learned_weighting'])
def test_set_model_weights_starts_a_fresh_history(setup, carried, builder):
  process = (carried['forward'] if builder == 'hypergradient' else
             hg.build_learned_weighting_fed_avg(
                 setup.model, initial_server_learning_rate=0.5,
                 tangent_decay=0.8))
  state = _after_rounds(process, setup.data, 3)
  assert np.linalg.norm(state['base_tangent'][0]) > 0
  new_weights = tff.learning.models.ModelWeights(
      trainable=[np.full_like(t, 0.25) for t in state['base'][0]],
      non_trainable=list(state['base'][1]))
  fresh = process.set_model_weights(state, new_weights)
  for key in ('pending', 'base_tangent', 'pending_tangent'):
    for t in tf.nest.flatten(fresh.get(key, ())):
      np.testing.assert_array_equal(t, np.zeros_like(t), err_msg=key)
  assert fresh['log_lr'] == pytest.approx(state['log_lr'])
  for got, want in zip(process.get_model_weights(fresh).trainable,
                       new_weights.trainable):
    np.testing.assert_allclose(got, want)
