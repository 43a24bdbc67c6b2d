"""jvp(..., tangent_seed=True): tangents drawn from a seed where needed."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad.core import cost

# Declared out of key order on purpose: tangents follow declaration order
# (TFF's), not tf.nest's sorted keys.
PARAMS = collections.OrderedDict(
    out=tff.TensorType(np.float32, [4]),
    hidden=collections.OrderedDict(
        kernel=tff.TensorType(np.float32, [3, 4]),
        bias=tff.TensorType(np.float32, [4])))
BATCH = collections.OrderedDict(x=tff.TensorType(np.float32, [5, 3]),
                                y=tff.TensorType(np.float32, [5]))
SEED = np.array([7, 11], np.int64)


def mlp_loss(params, batch):
  hidden = tf.tanh(batch['x'] @ params['hidden']['kernel'] +
                   params['hidden']['bias'])
  return tf.reduce_mean(
      (tf.reduce_sum(hidden * params['out'], -1) - batch['y']) ** 2)


@tff_fad.federated_computation(tff.FederatedType(PARAMS, tff.SERVER),
                               tff.FederatedType(BATCH, tff.CLIENTS))
def loss(params, data):
  return tff_fad.federated_mean(tff_fad.federated_map(
      mlp_loss, (tff_fad.federated_broadcast(params), data)))


def _values(num_clients=3):
  rng = np.random.default_rng(0)
  params = collections.OrderedDict(
      out=rng.normal(size=4).astype(np.float32),
      hidden=collections.OrderedDict(
          kernel=rng.normal(size=(3, 4)).astype(np.float32),
          bias=rng.normal(size=4).astype(np.float32)))
  data = [collections.OrderedDict(x=rng.normal(size=(5, 3)).astype(np.float32),
                                  y=rng.normal(size=5).astype(np.float32))
          for _ in range(num_clients)]
  return params, data


@pytest.mark.parametrize('k', [3, 40])  # Unrolled, and one tf.map_fn body.
def test_same_numbers_as_explicit_tangents_from_the_seed(k):
  params, data = _values()
  tangents = tff_fad.seeded_tangents(tf.constant(SEED), [params], k)[0]
  value, tangent = tff_fad.jvp(loss, num_directions=k)(params, data,
                                                       tangents)
  seeded_value, seeded_tangent = tff_fad.jvp(
      loss, num_directions=k, tangent_seed=True)(params, data, SEED)
  assert seeded_value == pytest.approx(value, rel=1e-6)
  np.testing.assert_allclose(seeded_tangent, tangent, rtol=2e-5, atol=1e-6)


def test_directions_are_one_flat_standard_normal_draw_in_declaration_order():
  params, _ = _values()
  direction = tff_fad.seeded_direction(tf.constant(SEED), 2, [params])[0]
  flat = tf.random.stateless_normal(
      [4 + 12 + 4], tf.random.experimental.stateless_fold_in(SEED, 2))
  np.testing.assert_array_equal(direction['out'], flat[:4])
  np.testing.assert_array_equal(direction['hidden']['kernel'],
                                tf.reshape(flat[4:16], [3, 4]))
  np.testing.assert_array_equal(direction['hidden']['bias'], flat[16:])


def test_downlink_carries_the_seed_not_the_tangents():
  model_bytes = (4 + 12 + 4) * 4
  primal = cost.communication_cost(loss, 10)
  explicit = cost.communication_cost(tff_fad.jvp(loss, num_directions=8), 10)
  assert explicit.server_to_client_bytes_per_client == 9 * model_bytes
  for k in (8, 100):
    seeded = cost.communication_cost(
        tff_fad.jvp(loss, num_directions=k, tangent_seed=True), 10)
    assert seeded.server_to_client_bytes_per_client == model_bytes + 16
    assert seeded.client_to_server_bytes_per_client == 4 * (k + 1)
    assert seeded.round_trips == primal.round_trips


def test_type_signature_takes_a_seed():
  seeded = tff_fad.jvp(loss, num_directions=5, tangent_seed=True)
  assert str(seeded.type_signature.parameter[2]) == 'int64[2]@SERVER'
  assert seeded.type_signature.parameter._name_array[2] == 'tangent_seed'  # pylint: disable=protected-access
  assert str(seeded.type_signature.result) == (
      '<float32@SERVER,float32[5]@SERVER>')


def test_bad_requests_are_refused():
  with pytest.raises(tff_fad.FederatedADError, match='num_directions'):
    tff_fad.jvp(loss, tangent_seed=True)
  with pytest.raises(tff_fad.FederatedADError, match='server-placed wrt'):
    tff_fad.jvp(loss, wrt='data', num_directions=2, tangent_seed=True)
