"""mode='auto' and choose_mode: the mode that communicates least, and why."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad

DIM = 1000  # A model-sized argument: 4 kB per copy.
EXAMPLE = collections.OrderedDict(x=tff.TensorType(np.float32, [DIM]),
                                  y=tff.TensorType(np.float32))


def squared_error(w, example):
  return 0.5 * (tf.reduce_sum(w * example['x']) - example['y']) ** 2


@tff_fad.federated_computation(
    tff.FederatedType(tff.TensorType(np.float32, [DIM]), tff.SERVER),
    tff.FederatedType(np.float32, tff.SERVER),
    tff.FederatedType(EXAMPLE, tff.CLIENTS))
def two_rounds(w, lr, data):
  for _ in range(2):
    grads = tff_fad.federated_map(
        lambda w, e: tf.gradients(squared_error(w, e), w)[0],
        (tff_fad.federated_broadcast(w), data))
    w = tff_fad.federated_apply(lambda w, lr, g: w - lr * g,
                                (w, lr, tff_fad.federated_mean(grads)))
  return tff_fad.federated_mean(tff_fad.federated_map(
      squared_error, (tff_fad.federated_broadcast(w), data)))


def test_scalar_wrt_feeding_a_model_sized_program_picks_forward():
  choice = tff_fad.choose_mode(two_rounds, wrt='lr', num_clients=100)
  assert choice.mode == 'forward'
  assert set(choice.costs) == set(tff_fad.MODES)
  forward, reverse = choice.costs['forward'], choice.costs['reverse']
  # The backward sweep waits for clients again.
  assert forward.round_trips == 3 < reverse.round_trips
  assert choice.seconds['forward'] < choice.seconds['reverse']
  text = str(choice)
  for mode in tff_fad.MODES:
    assert mode in text
  assert '100 clients' in text


def test_model_sized_wrt_picks_reverse():
  choice = tff_fad.choose_mode(two_rounds, wrt='w')
  assert choice.mode == 'reverse'
  # Forward mode would push one tangent per element: DIM x the model down.
  assert choice.costs['forward'].server_to_client_bytes_per_client > (
      DIM * choice.costs['reverse'].server_to_client_bytes_per_client / 4)
  # reverse_recompute re-sends what stateless clients forgot.
  assert choice.seconds['reverse'] < choice.seconds['reverse_recompute']


def test_the_cost_model_can_be_set():
  # With round trips 1000x dearer than the default, forward wins again.
  choice = tff_fad.choose_mode(
      two_rounds, wrt='w', cost_model=tff_fad.CostModel(
          seconds_per_round_trip=500.0))
  assert choice.mode == 'forward'
  stateless = tff_fad.choose_mode(two_rounds, wrt='w',
                                  candidates=('forward', 'reverse_recompute'))
  assert stateless.mode == 'reverse_recompute'
  assert set(stateless.costs) == {'forward', 'reverse_recompute'}


def test_auto_builds_the_chosen_program():
  data = [collections.OrderedDict(x=np.full(DIM, 0.01, np.float32),
                                  y=np.float32(1.0))]
  w = np.zeros(DIM, np.float32)
  auto = tff_fad.value_and_grad(two_rounds, wrt='lr', mode='auto')
  forward = tff_fad.value_and_grad(two_rounds, wrt='lr', mode='forward')
  assert str(auto.type_signature) == str(forward.type_signature)
  np.testing.assert_allclose(auto(w, 0.5, data), forward(w, 0.5, data),
                             rtol=1e-6)
  vjp = tff_fad.vjp(two_rounds, wrt='w', mode='auto')
  assert vjp.program.name == 'vjp_two_rounds'
  grad = tff_fad.grad(two_rounds, wrt='w', mode='reverse')
  np.testing.assert_allclose(vjp(w, 0.5, data, 2.0), 2 * grad(w, 0.5, data),
                             rtol=1e-5)


def test_unavailable_modes_say_why():
  choice = tff_fad.choose_mode(two_rounds, wrt='data')
  assert 'per-client gradient' in choice.costs['forward']
  assert choice.mode == 'reverse'
  assert 'unavailable' in str(choice)
  with pytest.raises(tff_fad.FederatedADError, match='candidates'):
    tff_fad.choose_mode(two_rounds, transform='vjp', candidates=('forward',))
  with pytest.raises(ValueError, match='bytes_per_second'):
    tff_fad.CostModel(bytes_per_second=0)
