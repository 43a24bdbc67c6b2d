"""A TFF user's own Keras model, tuple batches and TFF's argument names.

Every tff_fad builder takes what `tff.learning.algorithms.
build_weighted_fed_avg` takes and reads the model as TFF does
(tff_fad.learning.functional_models).
"""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad.data import digits
from tff_fad.learning import baffle
from tff_fad.learning import functional_models as fm
from tff_fad.learning import hypergradient_fed_avg as hg

_INPUT_SPEC = (tf.TensorSpec([None, 8, 8, 1], tf.float32),
               tf.TensorSpec([None], tf.int32))


def _keras_model():
  # Seeded so that every conversion starts from the same weights.
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(8, 8, 1)),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(16, activation='relu',
                            kernel_initializer=tf.keras.initializers
                            .GlorotUniform(seed=1)),
      tf.keras.layers.Dense(10, kernel_initializer=tf.keras.initializers
                            .GlorotUniform(seed=2)),
  ])


def _functional_model():
  return tff.learning.models.functional_model_from_keras(
      _keras_model(),
      tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      _INPUT_SPEC,
      collections.OrderedDict(
          accuracy=tf.keras.metrics.SparseCategoricalAccuracy))


@pytest.fixture(scope='module')
def keras_setup():
  fed = digits.load_federated_digits(num_clients=6, dirichlet_alpha=1.0,
                                     seed=0, source='sklearn')
  # (x, y) tuples, as tff.simulation.baselines tasks give them.
  data = [fed.train.create_tf_dataset_for_client(c).map(
      lambda e: (e['x'], e['y'])).batch(16) for c in fed.client_ids[:3]]
  return _functional_model(), data


def _builders():
  return {
      'hypergradient_forward': lambda m, **kw: hg.build_hypergradient_fed_avg(
          m, **kw),
      'hypergradient_reverse': lambda m, **kw: hg.build_hypergradient_fed_avg(
          m, mode='reverse', **kw),
      'learned_weighting': hg.build_learned_weighting_fed_avg,
      'baffle': lambda m, **kw: baffle.build_baffle(
          m, num_perturbations=8, **kw),
  }


@pytest.mark.parametrize('name', list(_builders()))
def test_a_keras_model_with_tuple_batches_trains_and_reports_its_metrics(
    keras_setup, name):
  model, data = keras_setup
  process = _builders()[name](lambda: model)  # A model_fn, as TFF takes.
  state = process.initialize()
  assert isinstance(state, tff.learning.templates.LearningAlgorithmState)
  for _ in range(2):
    output = process.next(state, data)
    state = output.state
  metrics = output.metrics
  assert list(metrics)[:4] == ['distributor', 'client_work', 'aggregator',
                               'finalizer']
  train = metrics['client_work']['train']
  assert list(train) == ['accuracy']
  assert 0.0 < train['accuracy'] <= 1.0
  assert metrics['finalizer']['update_non_finite'] == 0
  moved = [np.abs(a - b).max() for a, b in zip(
      state.global_model_weights.trainable, model.initial_weights[0])]
  assert max(moved) > 0


_FEDOPT = {
    'sgd': (lambda: tff.learning.optimizers.build_sgdm(0.7), 0.7),
    'sgdm': (lambda: tff.learning.optimizers.build_sgdm(0.7, momentum=0.9),
             0.7),
    'adam': (lambda: tff.learning.optimizers.build_adam(0.05), 0.05),
    'yogi': (lambda: tff.learning.optimizers.build_yogi(0.05), 0.05),
}


@pytest.mark.parametrize('client_weighting, server_optimizer', [
    (tff.learning.ClientWeighting.UNIFORM, 'sgd'),
    (tff.learning.ClientWeighting.NUM_EXAMPLES, 'sgd'),
    (tff.learning.ClientWeighting.NUM_EXAMPLES, 'sgdm'),
    (tff.learning.ClientWeighting.NUM_EXAMPLES, 'adam'),
    (tff.learning.ClientWeighting.NUM_EXAMPLES, 'yogi'),
])
def test_a_fixed_rate_is_tffs_fed_avg(keras_setup, client_weighting,
                                      server_optimizer):
  # With a hyper-optimizer of rate 0, hypergradient FedOpt is TFF's FedOpt
  # with the same server optimizer: the wrapping adds no drift.
  model, data = keras_setup
  build_server_optimizer, rate = _FEDOPT[server_optimizer]
  kwargs = dict(
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
      server_optimizer_fn=build_server_optimizer(),
      client_weighting=client_weighting)
  tff_process = tff.learning.algorithms.build_weighted_fed_avg(model,
                                                               **kwargs)
  fad_process = hg.build_hypergradient_fed_avg(
      model, hyper_optimizer_fn=tff.learning.optimizers.build_sgdm(0.0),
      **kwargs)
  tff_state, fad_state = tff_process.initialize(), fad_process.initialize()
  for _ in range(3):
    tff_out = tff_process.next(tff_state, data)
    fad_out = fad_process.next(fad_state, data)
    tff_state, fad_state = tff_out.state, fad_out.state
    assert fad_out.metrics['client_work']['train'] == pytest.approx(
        tff_out.metrics['client_work']['train'], rel=1e-6)
    assert fad_out.metrics['hyperparameters'][
        'server_learning_rate'] == pytest.approx(rate, rel=1e-6)
  for fad_w, tff_w in zip(fad_state.global_model_weights.trainable,
                          tff_state.global_model_weights.trainable):
    np.testing.assert_allclose(fad_w, tff_w, rtol=2e-5, atol=2e-6)
  assert np.abs(tff_state.global_model_weights.trainable[0] -
                model.initial_weights[0][0]).max() > 1e-2


def test_learned_weighting_with_exponent_one_and_a_fixed_rate_is_fed_avg(
    keras_setup):
  model, data = keras_setup
  sgd = tff.learning.optimizers.build_sgdm
  tff_process = tff.learning.algorithms.build_weighted_fed_avg(
      model, client_optimizer_fn=sgd(0.1), server_optimizer_fn=sgd(0.7))
  fad_process = hg.build_learned_weighting_fed_avg(
      model, sgd(0.1), sgd(0.7), hyper_optimizer_fn=sgd(0.0),
      initial_weight_exponent=1.0)
  tff_state, fad_state = tff_process.initialize(), fad_process.initialize()
  for _ in range(2):
    tff_state = tff_process.next(tff_state, data).state
    fad_state = fad_process.next(fad_state, data).state
  for fad_w, tff_w in zip(fad_state.global_model_weights.trainable,
                          tff_state.global_model_weights.trainable):
    np.testing.assert_allclose(fad_w, tff_w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('mode', hg.MODES)
def test_hparams_read_and_set_the_learned_rate(keras_setup, mode):
  model, data = keras_setup
  process = hg.build_hypergradient_fed_avg(
      model, server_optimizer_fn=tff.learning.optimizers.build_sgdm(0.5),
      mode=mode)
  state = process.initialize()
  for _ in range(2):  # The first round has no pending step to judge.
    state = process.next(state, data).state
  hparams = process.get_hparams(state)
  learned = np.exp(state.finalizer['log_lr'])
  assert hparams['finalizer']['learning_rate'] == pytest.approx(learned)
  assert learned != pytest.approx(0.5)  # It was learned, not kept.

  hparams['finalizer']['learning_rate'] = 2.0
  reset = process.set_hparams(state, hparams)
  assert process.get_hparams(reset)['finalizer']['learning_rate'] == (
      pytest.approx(2.0))
  # The model moves along the pending update as if 2.0 had been used.
  for new, old, pending in zip(reset.global_model_weights.trainable,
                               state.global_model_weights.trainable,
                               state.finalizer['pending']):
    np.testing.assert_allclose(new, old - (2.0 - learned) * pending,
                               rtol=1e-5, atol=1e-6)
  output = process.next(reset, data)
  assert output.metrics['hyperparameters'][
      'server_learning_rate'] == pytest.approx(2.0)


def test_learned_weighting_hparams_hold_the_exponent(keras_setup):
  model, data = keras_setup
  process = hg.build_learned_weighting_fed_avg(model,
                                               initial_weight_exponent=0.5)
  state = process.next(process.initialize(), data).state
  hparams = process.get_hparams(state)
  assert set(hparams['finalizer']) == {'learning_rate', 'weight_exponent'}
  assert hparams['finalizer']['weight_exponent'] == pytest.approx(
      state.finalizer['weight_exponent'])
  hparams['finalizer']['weight_exponent'] = -1.0
  reset = process.set_hparams(state, hparams)
  output = process.next(reset, data)
  assert output.metrics['hyperparameters'][
      'weight_exponent'] == pytest.approx(-1.0)


def test_a_non_positive_rate_is_refused_by_set_hparams(keras_setup):
  model, data = keras_setup
  process = hg.build_hypergradient_fed_avg(model)
  state = process.initialize()
  hparams = process.get_hparams(state)
  hparams['finalizer']['learning_rate'] = 0.0
  with pytest.raises(Exception, match='learning_rate must be > 0'):
    process.set_hparams(state, hparams)
  del data


def test_baffle_hparams_are_its_server_optimizers(keras_setup):
  model, data = keras_setup
  process = baffle.build_baffle(
      model, server_optimizer_fn=tff.learning.optimizers.build_adam(0.01),
      num_perturbations=4)
  state = process.initialize()
  hparams = process.get_hparams(state)
  assert hparams['finalizer']['learning_rate'] == pytest.approx(0.01)
  hparams['finalizer']['learning_rate'] = 0.0
  frozen = process.set_hparams(state, hparams)
  after = process.next(frozen, data).state
  for a, b in zip(after.global_model_weights.trainable,
                  state.global_model_weights.trainable):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('batch, message', [
    (collections.OrderedDict(image=1, label=2), "keys 'x' and 'y'.*image"),
    ((1, 2, 3), 'an \\(x, y\\) pair'),
])
def test_batches_of_another_shape_are_named(batch, message):
  with pytest.raises(ValueError, match=message):
    fm.batch_inputs(batch)


def test_a_variable_model_is_refused_with_the_conversion_to_use():
  def variable_model_fn():
    return tff.learning.models.from_keras_model(
        _keras_model(), loss=tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), input_spec=_INPUT_SPEC)

  with pytest.raises(TypeError,
                     match='VariableModel.*functional_model_from_keras'):
    hg.build_hypergradient_fed_avg(variable_model_fn)


def test_the_round_uses_only_tffs_intrinsics_once_each_way(keras_setup):
  model, _ = keras_setup
  process = hg.build_hypergradient_fed_avg(model)
  cost = tff_fad.communication_cost(process.next, 3)
  assert cost.round_trips == 1
