"""Hypergradient FedAvg: the learned-rate derivative, its modes and costs."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad.data import digits
from tff_fad.learning import functional_models as fm
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
      model, server_optimizer_fn=_sgd(0.5), mode=mode, tangent_decay=0.0)
               for mode in hg.MODES}
  # The same with the post-update loss over all the clients' batches.
  all_batches = {mode: hg.build_hypergradient_fed_avg(
      model, server_optimizer_fn=_sgd(0.5), mode=mode, tangent_decay=0.0,
      post_update_loss='all_batches') for mode in hg.MODES}
  return collections.namedtuple(
      'Setup', 'net model data processes all_batches')(
          net, model, data, processes, all_batches)


def _processes(setup, post_update_loss):
  return (setup.processes if post_update_loss == 'first_batch'
          else setup.all_batches)


def _sgd(learning_rate):
  return tff.learning.optimizers.build_sgdm(learning_rate)


def _log_lr(state):
  return state.finalizer['log_lr']


def _pair(state):
  weights = state.global_model_weights
  return (tuple(weights.trainable), tuple(weights.non_trainable))


def _after_rounds(process, data, n):
  state = process.initialize()
  for _ in range(n):
    state = process.next(state, data).state
  return state


def test_is_a_learning_process(setup):
  process = setup.processes['forward']
  assert isinstance(process, tff.learning.templates.LearningProcess)
  state = process.initialize()
  assert isinstance(state, tff.learning.templates.LearningAlgorithmState)
  assert _log_lr(state) == pytest.approx(np.log(0.5))
  weights = process.get_model_weights(state)
  np.testing.assert_allclose(weights.trainable[0],
                             setup.model.initial_weights[0][0])


@pytest.mark.parametrize('post_update_loss', hg.POST_UPDATE_LOSSES)
@pytest.mark.parametrize('mode', hg.MODES)
def test_hypergradient_matches_finite_differences_of_post_update_loss(
    setup, mode, post_update_loss):
  process = _processes(setup, post_update_loss)[mode]
  state = _after_rounds(process, setup.data, 1)
  round_program = hg.build_round_program(
      setup.model, _sgd(0.1), post_update_loss=post_update_loss)
  eps = 1e-2

  def loss_at(log_lr):
    return round_program(_pair(state), np.float32(log_lr),
                         state.finalizer['pending'], _log_lr(state),
                         setup.data)[0]

  finite_difference = (loss_at(_log_lr(state) + eps) -
                       loss_at(_log_lr(state) - eps)) / (2 * eps)
  metrics = process.next(state, setup.data).metrics['hyperparameters']
  assert abs(finite_difference) > 1e-4  # A real signal, not 0 == 0.
  assert metrics['hypergradient'] == pytest.approx(finite_difference,
                                                   rel=2e-2)
  assert metrics['post_update_loss'] == pytest.approx(
      loss_at(_log_lr(state)), rel=1e-5)
  # ... which is the clients' loss at the round's model, computed centrally.
  assert metrics['post_update_loss'] == pytest.approx(_post_update_loss(
      setup.model, _pair(state), setup.data, post_update_loss), rel=1e-5)


@pytest.mark.parametrize('post_update_loss', hg.POST_UPDATE_LOSSES)
def test_forward_and_reverse_modes_agree(setup, post_update_loss):
  processes = _processes(setup, post_update_loss)
  state = _after_rounds(processes['forward'], setup.data, 1)
  forward = processes['forward'].next(state, setup.data)
  reverse = processes['reverse'].next(state, setup.data)
  assert forward.metrics['hyperparameters']['hypergradient'] == (
      pytest.approx(reverse.metrics['hyperparameters']['hypergradient'],
                    rel=1e-4))
  np.testing.assert_allclose(_log_lr(forward.state), _log_lr(reverse.state),
                             rtol=1e-5)
  tf.nest.map_structure(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      forward.state.finalizer['pending'], reverse.state.finalizer['pending'])


def test_first_batch_loss_rides_on_local_training(setup):
  """The fused client function trains exactly as local training does and
  reports the first batch's loss; its forward rule's tangent is the first
  step's gradient along the tangent, its reverse rule that gradient."""
  weighting = tff.learning.ClientWeighting.NUM_EXAMPLES
  fused = hg.build_training_with_first_batch_loss(setup.model, _sgd(0.1),
                                                  weighting)
  train = fm.build_local_training(setup.model, _sgd(0.1), weighting)
  weights = tuple(tuple(tf.constant(w) for w in part)
                  for part in setup.model.initial_weights)
  rng = np.random.default_rng(0)
  tangent = (tuple(tf.constant(rng.normal(size=w.shape), tf.float32)
                   for w in weights[0]),
             tuple(tf.zeros_like(w) for w in weights[1]))
  dataset = setup.data[0]
  (loss_sum, count), outputs = fused(weights, dataset)
  tf.nest.map_structure(np.testing.assert_array_equal, outputs,
                        train(weights, dataset))
  x, y = fm.batch_inputs(next(iter(dataset)))
  with tf.GradientTape() as tape:
    tape.watch(weights[0])
    loss = setup.model.loss(
        output=setup.model.predict_on_batch(weights, x, training=True),
        label=y)
  gradient = tape.gradient(loss, weights[0])
  n = float(len(y))
  assert count == n
  assert float(loss_sum) == pytest.approx(float(loss) * n, rel=1e-6)
  ((_, _), jvp_outputs), ((d_loss_sum, _), d_outputs) = fused.jvp_rule(
      [weights, dataset], [tangent, None], num_directions=None)
  tf.nest.map_structure(np.testing.assert_array_equal, jvp_outputs, outputs)
  for t in tf.nest.flatten(d_outputs):
    np.testing.assert_array_equal(t, np.zeros_like(t))
  expected = n * sum(float(tf.reduce_sum(g * t))
                     for g, t in zip(gradient, tangent[0]))
  assert float(d_loss_sum) == pytest.approx(expected, rel=1e-5)
  d_weights, d_dataset = fused.vjp_rule(
      [weights, dataset], [True, False],
      ((tf.constant(2.0), tf.constant(0.0)),
       tf.nest.map_structure(tf.zeros_like, outputs)))
  assert d_dataset is None
  for got, g in zip(d_weights[0], gradient):
    np.testing.assert_allclose(got, 2.0 * n * g, rtol=1e-5, atol=1e-7)


def test_both_post_update_losses_communicate_the_same(setup):
  for mode in hg.MODES:
    assert tff_fad.communication_cost(setup.processes[mode].next, 3) == (
        tff_fad.communication_cost(setup.all_batches[mode].next, 3))


@pytest.fixture(scope='module')
def carried(setup):
  """Processes that carry d(model)/d(log lr) across rounds, both modes."""
  return {mode: hg.build_hypergradient_fed_avg(
      setup.model, server_optimizer_fn=_sgd(0.5), mode=mode,
      tangent_decay=0.8) for mode in hg.MODES}


def test_model_tangent_accumulates_decayed_server_steps(setup, carried):
  process = carried['forward']
  s1 = _after_rounds(process, setup.data, 1)
  s2 = process.next(s1, setup.data).state
  s3 = process.next(s2, setup.data).state
  # Round 1 starts from no pending update, so round 2 is the first step.
  for t in s1.finalizer['model_tangent']:
    np.testing.assert_array_equal(t, np.zeros_like(t))
  lr2, lr3 = np.exp(_log_lr(s1)), np.exp(_log_lr(s2))
  for t2, t3, p2, p3 in zip(s2.finalizer['model_tangent'],
                            s3.finalizer['model_tangent'],
                            s1.finalizer['pending'], s2.finalizer['pending']):
    np.testing.assert_allclose(t2, -lr2 * p2, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(t3, 0.8 * (-lr2 * p2) - lr3 * p3, rtol=1e-5,
                               atol=1e-8)
  assert np.linalg.norm(s3.finalizer['model_tangent'][0]) > 0


@pytest.mark.parametrize('mode', hg.MODES)
def test_carried_hypergradient_matches_finite_differences(setup, carried,
                                                          mode):
  process = carried[mode]
  state = _after_rounds(process, setup.data, 3)
  round_program = hg.build_round_program(setup.model, _sgd(0.1))
  eps = 1e-2
  pending = state.finalizer['pending']

  def post_update_loss(shift, carry=True):
    # The last rounds' steps move with the rate: the stored model along
    # 0.8 * tangent.
    model, non_trainable = _pair(state)
    if carry:
      model = tuple(np.float32(m + shift * 0.8 * t) for m, t in zip(
          model, state.finalizer['model_tangent']))
    return round_program((model, non_trainable),
                         np.float32(_log_lr(state) + shift), pending,
                         _log_lr(state), setup.data)[0]

  finite_difference = (post_update_loss(eps) - post_update_loss(-eps)) / (
      2 * eps)
  greedy = (post_update_loss(eps, carry=False) -
            post_update_loss(-eps, carry=False)) / (2 * eps)
  reported = process.next(state, setup.data).metrics['hyperparameters'][
      'hypergradient']
  assert abs(finite_difference - greedy) > 1e-3  # The carry matters here.
  assert reported == pytest.approx(finite_difference, rel=2e-2)


def test_carried_forward_and_reverse_modes_agree(setup, carried):
  state = _after_rounds(carried['forward'], setup.data, 3)
  forward = carried['forward'].next(state, setup.data)
  reverse = carried['reverse'].next(state, setup.data)
  assert forward.metrics['hyperparameters']['hypergradient'] == (
      pytest.approx(reverse.metrics['hyperparameters']['hypergradient'],
                    rel=1e-4))
  tf.nest.map_structure(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      forward.state.finalizer['model_tangent'],
      reverse.state.finalizer['model_tangent'])


def test_the_carry_costs_no_communication(setup, carried):
  for mode in hg.MODES:
    assert tff_fad.communication_cost(carried[mode].next, 3) == (
        tff_fad.communication_cost(setup.processes[mode].next, 3))


def test_model_is_the_round_model_minus_the_new_rate_times_the_update(setup):
  process = setup.processes['forward']
  initial = process.initialize()
  state = process.next(initial, setup.data).state
  lr = np.exp(_log_lr(state))
  # Round 0 trained from the initial model (nothing was pending).
  expected = [m - lr * p for m, p in zip(initial.global_model_weights.trainable,
                                         state.finalizer['pending'])]
  tf.nest.map_structure(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
      list(process.get_model_weights(state).trainable), expected)
  assert np.linalg.norm(state.finalizer['pending'][0]) > 0  # It moved.


def test_learning_rate_moves_against_the_hypergradient(setup):
  process = setup.processes['forward']
  state = _after_rounds(process, setup.data, 1)
  output = process.next(state, setup.data)
  step = _log_lr(output.state) - _log_lr(state)
  hypergradient = output.metrics['hyperparameters']['hypergradient']
  assert hypergradient != 0
  assert np.sign(step) == -np.sign(hypergradient)


@pytest.mark.parametrize('mode', hg.MODES)
def test_a_round_without_clients_has_no_loss_and_keeps_the_rate(setup, mode):
  # It reported a post-update loss of 0.0.
  process = setup.processes[mode]
  state = process.initialize()
  output = process.next(state, [])
  hyperparameters = output.metrics['hyperparameters']
  assert np.isnan(hyperparameters['post_update_loss'])
  assert hyperparameters['hypergradient'] == 0.0  # Not NaN: the rate holds.
  assert _log_lr(output.state) == pytest.approx(_log_lr(state))


def test_communication_cost_of_the_modes(setup):
  # sklearn digits, linear model: 65 x 10 weights = 650 floats = 2,600 B.
  model_bytes = setup.net.num_params * 4
  forward = tff_fad.communication_cost(setup.processes['forward'].next, 3)
  reverse = tff_fad.communication_cost(setup.processes['reverse'].next, 3)
  # Forward: one broadcast of <w, dw>; uploads: model update + its weight
  # (4 B), <(loss, count), (dloss, dcount)> (16 B), the model's three metric
  # sums (12 B).
  assert forward.server_to_client_bytes_per_client == 2 * model_bytes
  assert forward.client_to_server_bytes_per_client == model_bytes + 32
  assert forward.round_trips == 1
  # Reverse: w, then the cotangent of (loss, count) (8 B); uploads: (loss,
  # count) (8 B), the loss gradient (model-size), the update etc. (16 B).
  assert reverse.server_to_client_bytes_per_client == model_bytes + 8
  assert reverse.client_to_server_bytes_per_client == 2 * model_bytes + 24
  assert reverse.round_trips == 2


@pytest.mark.parametrize('kwargs, message', [
    (dict(mode='sideways'), 'mode must be one of'),
    (dict(post_update_loss='last_batch'), 'post_update_loss must be one of'),
    (dict(server_optimizer_fn=_sgd(0.0)),
     'initial server learning rate must be > 0'),
    (dict(server_optimizer_fn=tff.learning.optimizers.build_adamw(0.1)),
     'weight decay'),
    (dict(tangent_decay=1.0), r'tangent_decay must be in \[0, 1\)'),
    (dict(tangent_decay=-0.5), r'tangent_decay must be in \[0, 1\)'),
])
def test_bad_arguments(setup, kwargs, message):
  with pytest.raises(ValueError, match=message):
    hg.build_hypergradient_fed_avg(setup.model, **kwargs)


@pytest.mark.parametrize('builder', [hg.build_hypergradient_fed_avg,
                                     hg.build_learned_weighting_fed_avg])
@pytest.mark.parametrize('kwargs, message', [
    (dict(model_fn=tf.keras.Sequential([tf.keras.layers.Dense(2)])),
     'got a Keras model.*functional_model_from_keras'),
    (dict(model_fn=lambda: 'not a model'), 'got str'),
    (dict(client_optimizer_fn=lambda: tf.keras.optimizers.SGD(0.1)),
     'client_optimizer_fn must be a tff.learning.optimizers.Optimizer'),
    (dict(hyper_optimizer_fn='adam'),
     'hyper_optimizer_fn must be a tff.learning.optimizers.Optimizer'),
])
def test_wrong_kinds_of_arguments_are_named(setup, builder, kwargs, message):
  kwargs = {'model_fn': setup.model, **kwargs}
  with pytest.raises(TypeError, match=message):
    builder(**kwargs)


@pytest.fixture(scope='module')
def weighting(setup):
  process = hg.build_learned_weighting_fed_avg(
      setup.model, server_optimizer_fn=_sgd(0.5), tangent_decay=0.0)
  round_program = hg.build_learned_weighting_round_program(setup.model,
                                                           _sgd(0.1))
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
  reported = process.next(s1, second).metrics['hyperparameters']
  eps = 1e-2
  lr1 = np.exp(_log_lr(s1))

  def loss_after_round_zero_with(exponent):
    # Round 0's update, averaged with weights n_i ** exponent ...
    (_, pending), (w0, _) = round_program(
        _pair(s0), _log_lr(s0), s0.finalizer['pending'], _log_lr(s0),
        np.float32(exponent), first)
    # ... applied at the new rate, then round 1's clients' loss there.
    model = (tuple(np.float32(w - lr1 * p) for w, p in zip(w0[0], pending)),
             w0[1])
    (loss, _), _ = round_program(model, _log_lr(s1), pending, _log_lr(s1),
                                 s1.finalizer['weight_exponent'], second)
    return loss

  exponent = s0.finalizer['weight_exponent']
  finite_difference = (loss_after_round_zero_with(exponent + eps) -
                       loss_after_round_zero_with(exponent - eps)) / (2 * eps)
  assert abs(finite_difference) > 1e-5
  assert reported['hypergradient_weight_exponent'] == pytest.approx(
      finite_difference, rel=3e-2)
  assert reported['weight_exponent'] == pytest.approx(
      s1.finalizer['weight_exponent'])


def test_carried_weighting_hypergradients_match_finite_differences(setup):
  process = hg.build_learned_weighting_fed_avg(
      setup.model, server_optimizer_fn=_sgd(0.5), tangent_decay=0.8)
  round_program = hg.build_learned_weighting_round_program(setup.model,
                                                           _sgd(0.1))
  state = _after_rounds(process, setup.data, 3)
  reported = process.next(state, setup.data).metrics['hyperparameters']
  finalizer = state.finalizer
  lr = np.exp(_log_lr(state))
  eps = 1e-2

  def loss_along(direction, shift):
    # Direction 0 shifts log_lr, 1 the exponent. The earlier rounds' steps
    # move along 0.8 * model_tangent; along the exponent the last step moves
    # too, with the pending update's tangent.
    model, non_trainable = _pair(state)
    model = tuple(
        np.float32(m + shift * (0.8 * t[direction] - (direction == 1) * lr *
                                dp))
        for m, t, dp in zip(model, finalizer['model_tangent'],
                            finalizer['pending_tangent']))
    (loss, _), _ = round_program(
        (model, non_trainable),
        np.float32(_log_lr(state) + shift * (direction == 0)),
        finalizer['pending'], _log_lr(state),
        np.float32(finalizer['weight_exponent'] + shift * (direction == 1)),
        setup.data)
    return loss

  for direction, key in enumerate(('hypergradient',
                                   'hypergradient_weight_exponent')):
    finite_difference = (loss_along(direction, eps) -
                         loss_along(direction, -eps)) / (2 * eps)
    assert abs(finite_difference) > 1e-5
    assert reported[key] == pytest.approx(finite_difference, rel=3e-2), key
  assert np.linalg.norm(finalizer['model_tangent'][0][1]) > 0


@pytest.mark.parametrize('builder', ['hypergradient', 'learned_weighting'])
def test_set_model_weights_starts_a_fresh_history(setup, carried, builder):
  process = (carried['forward'] if builder == 'hypergradient' else
             hg.build_learned_weighting_fed_avg(
                 setup.model, server_optimizer_fn=_sgd(0.5),
                 tangent_decay=0.8))
  state = _after_rounds(process, setup.data, 3)
  assert np.linalg.norm(state.finalizer['model_tangent'][0]) > 0
  new_weights = tff.learning.models.ModelWeights(
      trainable=[np.full_like(t, 0.25)
                 for t in state.global_model_weights.trainable],
      non_trainable=list(state.global_model_weights.non_trainable))
  fresh = process.set_model_weights(state, new_weights)
  for key in ('pending', 'model_tangent', 'pending_tangent'):
    for t in tf.nest.flatten(fresh.finalizer.get(key, ())):
      np.testing.assert_array_equal(t, np.zeros_like(t), err_msg=key)
  assert _log_lr(fresh) == pytest.approx(_log_lr(state))
  for got, want in zip(process.get_model_weights(fresh).trainable,
                       new_weights.trainable):
    np.testing.assert_allclose(got, want)


def test_learned_weighting_keeps_plain_server_sgd(setup):
  with pytest.raises(ValueError, match='plain server SGD.*beta_1'):
    hg.build_learned_weighting_fed_avg(
        setup.model,
        server_optimizer_fn=tff.learning.optimizers.build_adam(0.1))


# ----------------------------------------------------------------------------
# Any FedOpt server optimizer: the learned rate is the optimizer's own.

_SERVER_OPTIMIZERS = {
    'sgd': lambda lr: tff.learning.optimizers.build_sgdm(lr),
    'sgdm': lambda lr: tff.learning.optimizers.build_sgdm(lr, momentum=0.9),
    'adam': lambda lr: tff.learning.optimizers.build_adam(lr),
}


def _post_update_loss(model, weights, data, post_update_loss='first_batch'):
  """The clients' example-weighted mean loss at `weights`, centrally: over
  each client's first batch or all its batches."""
  total, count = 0.0, 0
  for dataset in data:
    if post_update_loss == 'first_batch':
      dataset = dataset.take(1)
    for batch in dataset:
      x, y = (batch['x'], batch['y']) if isinstance(batch, dict) else batch
      predictions = model.predict_on_batch(weights, x, training=False)
      total += float(model.loss(output=predictions, label=y)) * len(y)
      count += len(y)
  return total / count


def _tff_fedopt_two_rounds(model, data, optimizer, lr, second_lr):
  """TFF's FedOpt: one round at `lr`, one at `second_lr` (its set_hparams)."""
  process = tff.learning.algorithms.build_weighted_fed_avg(
      model, client_optimizer_fn=_sgd(0.1),
      server_optimizer_fn=_SERVER_OPTIMIZERS[optimizer](lr))
  state = process.next(process.initialize(), data).state
  hparams = process.get_hparams(state)
  hparams['finalizer']['learning_rate'] = np.float32(second_lr)
  state = process.next(process.set_hparams(state, hparams), data).state
  weights = state.global_model_weights
  return (tuple(weights.trainable), tuple(weights.non_trainable))


@pytest.mark.parametrize('optimizer, mode, post_update_loss', [
    (optimizer, mode, 'first_batch') for optimizer in _SERVER_OPTIMIZERS
    for mode in hg.MODES] + [('sgdm', 'forward', 'all_batches'),
                             ('adam', 'reverse', 'all_batches')])
def test_hypergradient_of_any_server_optimizer_matches_finite_differences(
    setup, optimizer, mode, post_update_loss):
  """d post-update loss / d log lr against TFF's FedOpt at lr +- eps.

  Round 3 reports the loss at the model after two rounds of the optimizer
  and its derivative w.r.t. the rate of the second step (greedy: the
  optimizer's state after step one is the same for every rate, since TFF's
  optimizers' states do not depend on the rate).
  """
  lr = 0.3 if optimizer != 'adam' else 0.01
  process = hg.build_hypergradient_fed_avg(
      setup.model, client_optimizer_fn=_sgd(0.1),
      server_optimizer_fn=_SERVER_OPTIMIZERS[optimizer](lr),
      hyper_optimizer_fn=_sgd(0.0), mode=mode, tangent_decay=0.0,
      post_update_loss=post_update_loss)
  state = _after_rounds(process, setup.data, 2)
  metrics = process.next(state, setup.data).metrics['hyperparameters']
  # The loss at the model after two rounds is TFF's FedOpt's.
  at_lr = _tff_fedopt_two_rounds(setup.model, setup.data, optimizer, lr, lr)
  assert metrics['post_update_loss'] == pytest.approx(
      _post_update_loss(setup.model, at_lr, setup.data, post_update_loss),
      rel=1e-5)
  for w, tff_w in zip(_pair(state)[0], at_lr[0]):
    np.testing.assert_allclose(w, tff_w, rtol=2e-5, atol=2e-6)
  # Greedy: only the second step's rate moves; d/d log lr by central finite
  # differences of TFF's own FedOpt.
  eps = 1e-2
  plus, minus = (_post_update_loss(
      setup.model,
      _tff_fedopt_two_rounds(setup.model, setup.data, optimizer, lr,
                             lr * np.exp(sign * eps)),
      setup.data, post_update_loss) for sign in (1, -1))
  finite_difference = (plus - minus) / (2 * eps)
  assert abs(finite_difference) > 1e-4
  assert metrics['hypergradient'] == pytest.approx(finite_difference,
                                                   rel=2e-2, abs=1e-5)


# ----------------------------------------------------------------------------
# DP: every release of client data that steers the rate is a DP release.


def _dp(clip, noise=0.5):
  return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
      noise_multiplier=noise, clients_per_round=3.0, clip=clip)


def test_dp_round_releases_only_through_dp_aggregators(setup):
  private = dict(model_aggregator=_dp(1.0), loss_aggregator=_dp(5.0),
                 hypergradient_aggregator=_dp(0.5))
  report = hg.round_privacy_report(
      setup.model, _sgd(0.1), metrics_released=False, sampling_rate=0.3,
      rounds=20, delta=1e-5, **private)
  assert [(r.kind, r.mechanism) for r in report.releases] == [
      ('value', 'dp'), ('tangent', 'dp'), ('value', 'dp')]
  assert report.non_private_releases == []
  assert 0 < report.epsilon < float('inf')
  # The derivative program the process runs aggregates client data only
  # through the loss's DP point (the update goes to the model aggregator).
  loss_point = hg._loss_point(private['model_aggregator'],
                              private['loss_aggregator'],
                              private['hypergradient_aggregator'], 'forward')
  round_program = hg.build_round_program(setup.model, _sgd(0.1),
                                         loss_point=loss_point)
  found = tff_fad.aggregation.releases(round_program, 'forward',
                                       ('model_weights', 'log_lr'))
  assert {r.mechanism for r in found} == {'dp'} and len(found) == 2
  # Released metrics are named as what breaks the guarantee.
  leaky = hg.round_privacy_report(setup.model, _sgd(0.1), sampling_rate=0.3,
                                  rounds=20, delta=1e-5, **private)
  assert leaky.epsilon == float('inf')
  assert [r.node for r in leaky.non_private_releases] == [
      'client_work/train metrics (metrics_aggregator)']


def test_dp_process_without_noise_is_the_clients_mean_loss(setup):
  """With zero noise and clips that never bind, the private loss is the
  uniform mean of the clients' first-batch losses and its derivative that
  of the same (private) round program."""
  private = dict(model_aggregator=_dp(1e6, 0.0),
                 loss_aggregator=_dp(1e6, 0.0),
                 hypergradient_aggregator=_dp(1e6, 0.0))
  process = hg.build_hypergradient_fed_avg(
      setup.model, _sgd(0.1), _sgd(0.5), tangent_decay=0.0,
      metrics_aggregator=fm.release_no_metrics, **private)
  state = _after_rounds(process, setup.data, 1)
  output = process.next(state, setup.data)
  metrics = output.metrics
  assert metrics['client_work']['train'] == collections.OrderedDict()
  assert set(metrics['aggregator']) == {'model_update', 'post_update_loss'}
  expected = np.mean([_post_update_loss(setup.model, _pair(state), [d])
                      for d in setup.data])
  hyper = metrics['hyperparameters']
  assert hyper['post_update_loss'] == pytest.approx(expected, rel=1e-5)
  loss_point = hg._loss_point(private['model_aggregator'],
                              private['loss_aggregator'],
                              private['hypergradient_aggregator'], 'forward')
  round_program = hg.build_round_program(setup.model, _sgd(0.1),
                                         loss_point=loss_point)
  eps = 1e-2

  def loss_at(log_lr):
    return round_program(_pair(state), np.float32(log_lr),
                         state.finalizer['pending'], _log_lr(state),
                         state.aggregator['post_update_loss'],
                         setup.data)[0]

  finite_difference = (loss_at(_log_lr(state) + eps) -
                       loss_at(_log_lr(state) - eps)) / (2 * eps)
  assert abs(finite_difference) > 1e-4
  assert hyper['hypergradient'] == pytest.approx(finite_difference, rel=2e-2)


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(model_aggregator=_dp(1.0)), ValueError,
     'model_aggregator is differentially private.*loss_aggregator'),
    (dict(loss_aggregator=_dp(1.0)), ValueError,
     'loss_aggregator and hypergradient_aggregator go together'),
    (dict(loss_aggregator=_dp(1.0), hypergradient_aggregator=_dp(1.0),
          mode='reverse'), ValueError, "needs mode='forward'"),
    (dict(loss_aggregator=tff.aggregators.MeanFactory(),
          hypergradient_aggregator=_dp(1.0)), TypeError,
     'loss_aggregator must be a tff.aggregators.UnweightedAggregationFactory'),
])
def test_private_losses_are_required_and_checked(setup, kwargs, error,
                                                 message):
  with pytest.raises(error, match=message):
    hg.build_hypergradient_fed_avg(setup.model, **kwargs)
