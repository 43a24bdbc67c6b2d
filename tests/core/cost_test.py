"""communication_cost against bytes computed by hand from the types."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad.core import cost

W = tff.FederatedType(tff.TensorType(np.float32, [2]), tff.SERVER)
DATA = tff.FederatedType(
    collections.OrderedDict(x=tff.TensorType(np.float32, [2]),
                            y=tff.TensorType(np.float32)), tff.CLIENTS)


@tff_fad.federated_computation(W, DATA)
def loss(w, data):
  return tff_fad.federated_mean(tff_fad.federated_map(
      lambda w, d: (tf.reduce_sum(w * d['x']) - d['y']) ** 2,
      (tff_fad.federated_broadcast(w), data)))


# Per client, for w: float32[2] (8 B) and a float32 loss (4 B):
#   primal:    down w (8)                       up loss (4)
#   jvp:       down <w, dw> (16)                up <loss, dloss> (8)
#   forward:   down <w, basis [2,2]> (8 + 16)   up <loss, dloss [2]> (4 + 8)
#   reverse:   down w (8) + ct/n (4)            up <loss, 1> (8) + ct_w (8)
#   reverse_recompute: reverse + re-broadcast w (8) in the backward sweep.
# Forward mode keeps the primal's one round trip; reverse modes add one.
@pytest.mark.parametrize('name, make, down, up, steps, trips', [
    ('primal', lambda: loss, 8, 4, 2, 1),
    ('jvp', lambda: tff_fad.jvp(loss), 16, 8, 2, 1),
    ('forward', lambda: tff_fad.value_and_grad(loss, mode='forward'),
     24, 12, 2, 1),
    ('reverse', lambda: tff_fad.value_and_grad(loss, mode='reverse'),
     12, 16, 4, 2),
    ('reverse_recompute',
     lambda: tff_fad.value_and_grad(loss, mode='reverse_recompute'),
     20, 16, 4, 2),
])
def test_cost_matches_hand_count(name, make, down, up, steps, trips):
  report = tff_fad.communication_cost(make(), num_clients=10)
  assert report.server_to_client_bytes_per_client == down, name
  assert report.client_to_server_bytes_per_client == up, name
  assert report.server_to_client_bytes == 10 * down
  assert report.client_to_server_bytes == 10 * up
  assert report.communication_steps == steps
  assert report.round_trips == trips


def test_recompute_mode_broadcasts_more_than_reverse():
  reverse = tff_fad.communication_cost(tff_fad.grad(loss), 5)
  recompute = tff_fad.communication_cost(
      tff_fad.grad(loss, mode='reverse_recompute'), 5)
  assert reverse.intrinsics['federated_broadcast'] == 2
  assert recompute.intrinsics['federated_broadcast'] == 3
  assert 'federated_broadcast x3' in str(recompute)


def test_cost_of_a_plain_tff_computation():
  @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS),
                             tff.FederatedType(np.float32, tff.CLIENTS))
  def weighted(x, w):
    return tff.federated_mean(x, weight=w)

  report = tff_fad.communication_cost(weighted, 4)
  assert report.client_to_server_bytes_per_client == 8
  assert report.intrinsics == {'federated_weighted_mean': 1}
  assert cost.intrinsics_used(weighted)['federated_weighted_mean'] == 1


def test_unknown_shapes_and_bad_client_counts_are_errors():
  @tff.federated_computation(
      tff.FederatedType(tff.TensorType(np.float32, [None]), tff.SERVER))
  def ragged_broadcast(x):
    return tff.federated_broadcast(x)

  with pytest.raises(ValueError, match='unknown dimension'):
    tff_fad.communication_cost(ragged_broadcast, 3)
  with pytest.raises(ValueError, match='num_clients must be a positive int'):
    tff_fad.communication_cost(loss, 0)
  with pytest.raises(TypeError, match='needs a tff.Computation'):
    tff_fad.communication_cost(lambda: None, 3)


def test_members_of_a_called_computation_keep_their_own_depth():
  client_floats = tff.FederatedType(np.float32, tff.CLIENTS)

  @tff.federated_computation(client_floats)
  def sum_and_passthrough(x):
    return tff.federated_sum(x), x

  @tff.federated_computation(client_floats)
  def outer(x):
    total, same = sum_and_passthrough(x)
    return total, tff.federated_sum(same)

  # Both sums read client values directly: one round trip, not two.
  report = tff_fad.communication_cost(outer, 2)
  assert (report.communication_steps, report.round_trips) == (1, 1)
  assert report.intrinsics == {'federated_sum': 2}


def test_primal_emits_what_a_hand_written_tff_program_would():
  local_loss = tff.tensorflow.computation(
      lambda w, d: (tf.reduce_sum(w * d['x']) - d['y']) ** 2,
      W.member, DATA.member)

  @tff.federated_computation(W, DATA)
  def hand_written(w, data):
    return tff.federated_mean(tff.federated_map(
        local_loss, (tff.federated_broadcast(w), data)))

  assert loss.type_signature.is_equivalent_to(hand_written.type_signature)
  assert cost.intrinsics_used(loss) == cost.intrinsics_used(hand_written)
  assert tff_fad.communication_cost(loss, 7) == tff_fad.communication_cost(
      hand_written, 7)
