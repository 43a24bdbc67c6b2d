"""stop_gradient, per-batch rules for dataset functions, and has_aux."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad.core import cost

RTOL = 1e-5
W = tff.FederatedType(tff.TensorType(np.float32, [2]), tff.SERVER)
BATCH = collections.OrderedDict(x=tff.TensorType(np.float32, [None, 2]),
                                y=tff.TensorType(np.float32, [None]))
DATASETS = tff.FederatedType(tff.SequenceType(BATCH), tff.CLIENTS)


def batch_loss(w, batch):
  return tf.reduce_sum((tf.linalg.matvec(batch['x'], w) - batch['y']) ** 2)


def dataset_loss(w, dataset):
  return dataset.reduce(0.0, lambda total, b: total + batch_loss(w, b))


def dataset_loss_jvp(primals, tangents):
  w, dataset = primals
  dw, _ = tangents

  def step(acc, batch):
    with tf.autodiff.ForwardAccumulator(w, dw) as fwd:
      loss = batch_loss(w, batch)
    return acc[0] + loss, acc[1] + fwd.jvp(loss)

  return dataset.reduce((0.0, 0.0), step)


def dataset_loss_vjp(primals, active, cotangent):
  w, dataset = primals

  def step(acc, batch):
    with tf.GradientTape() as tape:
      tape.watch(w)
      loss = batch_loss(w, batch)
    return acc + cotangent * tape.gradient(loss, w)

  grad_w = dataset.reduce(tf.zeros_like(w), step)
  return [grad_w if active[0] else None, None]


per_batch_loss = tff_fad.with_derivatives(
    dataset_loss, jvp=dataset_loss_jvp, vjp=dataset_loss_vjp)


@tff_fad.federated_computation(W, DATASETS)
def federated_dataset_loss(w, data):
  return tff_fad.federated_sum(tff_fad.federated_map(
      per_batch_loss, (tff_fad.federated_broadcast(w), data)))


def _client_data(seed=0, clients=3):
  rng = np.random.default_rng(seed)
  data = []
  for c in range(clients):
    n = 3 + 2 * c
    data.append(tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
        x=rng.normal(size=(n, 2)).astype(np.float32),
        y=rng.normal(size=n).astype(np.float32))).batch(2))
  return data


def _centralized(w, data):
  w = tf.Variable(w)
  with tf.GradientTape() as tape:
    loss = tf.add_n([batch_loss(w, b) for ds in data for b in ds])
  return loss.numpy(), tape.gradient(loss, w).numpy()


W0 = np.array([0.5, -1.5], np.float32)


@pytest.mark.parametrize('mode', tff_fad.MODES)
def test_dataset_function_with_per_batch_rules(mode):
  data = _client_data()
  expected_loss, expected_grad = _centralized(W0, data)
  value, gradient = tff_fad.value_and_grad(federated_dataset_loss, mode=mode)(
      W0, data)
  assert value == pytest.approx(expected_loss, rel=RTOL)
  np.testing.assert_allclose(gradient, expected_grad, rtol=RTOL)


def test_batched_directions_use_the_custom_rule():
  data = _client_data()
  _, expected_grad = _centralized(W0, data)
  directions = np.array([[1, 0], [0, 1], [2, -1]], np.float32)
  _, tangents = tff_fad.jvp(federated_dataset_loss, num_directions=3)(
      W0, data, directions)
  np.testing.assert_allclose(tangents, directions @ expected_grad, rtol=RTOL)


def _batched_dataset_loss(calls):
  """`federated_dataset_loss` whose client function's forward rule takes
  every direction at once, counting how often its dataset loop is traced."""

  def jvp_rule(primals, tangents, num_directions):
    calls.append(num_directions)
    w, dataset = primals
    dw, _ = tangents  # [k, 2], or [2] for one direction.

    def step(acc, batch):
      with tf.GradientTape() as tape:
        tape.watch(w)
        loss = batch_loss(w, batch)
      return acc[0] + loss, acc[1] + tf.linalg.matvec(
          tf.reshape(dw, [-1, 2]), tape.gradient(loss, w))

    total, tangent = dataset.reduce(
        (0.0, tf.zeros([1 if num_directions is None else num_directions])),
        step)
    return total, tangent[0] if num_directions is None else tangent

  batched = tff_fad.with_derivatives(dataset_loss, jvp=jvp_rule,
                                     vjp=dataset_loss_vjp, batched_jvp=True)

  @tff_fad.federated_computation(W, DATASETS)
  def loss(w, data):
    return tff_fad.federated_sum(tff_fad.federated_map(
        batched, (tff_fad.federated_broadcast(w), data)))

  return loss


@pytest.mark.parametrize('k', [None, 3, 40])  # One, unrolled, tf.map_fn's.
def test_a_batched_rule_runs_once_for_every_direction(k):
  calls = []
  loss = _batched_dataset_loss(calls)

  data = _client_data()
  expected_loss, expected_grad = _centralized(W0, data)
  directions = np.random.default_rng(0).normal(
      size=(2,) if k is None else (k, 2)).astype(np.float32)
  value, tangents = tff_fad.jvp(loss, num_directions=k)(W0, data, directions)
  assert calls == [k]  # Traced once, with all k directions.
  assert value == pytest.approx(expected_loss, rel=RTOL)
  np.testing.assert_allclose(tangents, directions @ expected_grad, rtol=RTOL,
                             atol=1e-5)


def test_a_batched_rule_gets_seeded_tangents_stacked():
  calls = []
  loss = _batched_dataset_loss(calls)

  data = _client_data()
  _, expected_grad = _centralized(W0, data)
  seed = np.array([3, 5], np.int64)
  _, tangents = tff_fad.jvp(loss, num_directions=4, tangent_seed=True)(
      W0, data, seed)
  directions = tff_fad.seeded_tangents(
      tf.constant(seed), [tf.TensorSpec([2], tf.float32)], 4)[0].numpy()
  assert calls == [4]
  np.testing.assert_allclose(tangents, directions @ expected_grad, rtol=RTOL,
                             atol=1e-5)
  with pytest.raises(ValueError, match='batched_jvp=True needs a jvp rule'):
    tff_fad.with_derivatives(dataset_loss, vjp=dataset_loss_vjp,
                             batched_jvp=True)


def test_missing_rule_for_a_mode_is_named():
  forward_only = tff_fad.with_derivatives(dataset_loss, jvp=dataset_loss_jvp)

  @tff_fad.federated_computation(W, DATASETS)
  def loss(w, data):
    return tff_fad.federated_sum(tff_fad.federated_map(
        forward_only, (tff_fad.federated_broadcast(w), data)))

  tff_fad.jvp(loss)  # Fine: a forward rule exists.
  with pytest.raises(tff_fad.NotDifferentiableError,
                     match='tff_fad.with_derivatives'):
    tff_fad.grad(loss, mode='reverse')
  with pytest.raises(ValueError, match='needs a jvp rule, a vjp rule'):
    tff_fad.with_derivatives(dataset_loss)


def local_training(w, dataset):
  """A dataset loop with no derivative rule: must stay off the active path."""
  return dataset.reduce(w, lambda v, b: v - 0.1 * tf.reduce_mean(b['x'], 0))


@tff_fad.federated_computation(W, DATASETS)
def loss_and_trained_models(w, data):
  w_at_clients = tff_fad.federated_broadcast(w)
  loss = tff_fad.federated_sum(
      tff_fad.federated_map(per_batch_loss, (w_at_clients, data)))
  trained = tff_fad.federated_map(
      local_training, (tff_fad.stop_gradient(w_at_clients), data))
  return loss, trained


def test_stop_gradient_and_has_aux_in_forward_mode():
  data = _client_data()
  expected_loss, expected_grad = _centralized(W0, data)
  jvp = tff_fad.jvp(loss_and_trained_models, has_aux=True)
  assert str(jvp.type_signature.result) == (
      '<float32@SERVER,float32@SERVER,{float32[2]}@CLIENTS>')
  direction = np.array([1.0, 2.0], np.float32)
  value, tangent, trained = jvp(W0, data, direction)
  assert value == pytest.approx(expected_loss, rel=RTOL)
  assert tangent == pytest.approx(expected_grad @ direction, rel=RTOL)
  assert len(trained) == 3
  np.testing.assert_allclose(
      trained[0], local_training(tf.constant(W0), data[0]).numpy(), rtol=RTOL)
  # One broadcast carries <w, dw> to the clients for both uses.
  report = tff_fad.communication_cost(jvp, 3)
  assert report.intrinsics == {'federated_broadcast': 1, 'federated_sum': 1}
  assert report.server_to_client_bytes_per_client == 16


def _loss_and_scaled_w(w, batch):
  """A loss and a value the caller only keeps as aux (a tuple output)."""
  return batch_loss(w, batch), 3.0 * w


@tff_fad.federated_computation(W, tff.FederatedType(BATCH, tff.CLIENTS))
def loss_with_aux_from_the_same_call(w, data):
  both = tff_fad.federated_map(_loss_and_scaled_w,
                               (tff_fad.federated_broadcast(w), data))
  # The aux member also goes through an aggregation with no rule.
  return tff_fad.federated_sum(both[0]), tff_fad.federated_max(both[1])


def test_forward_mode_computes_only_the_tangents_it_returns():
  rng = np.random.default_rng(1)
  data = [collections.OrderedDict(
      x=rng.normal(size=(3, 2)).astype(np.float32),
      y=rng.normal(size=3).astype(np.float32)) for _ in range(3)]
  w = tf.Variable(W0)
  with tf.GradientTape() as tape:
    expected_loss = tf.add_n([batch_loss(w, b) for b in data])
  expected_grad = tape.gradient(expected_loss, w).numpy()
  jvp = tff_fad.jvp(loss_with_aux_from_the_same_call, has_aux=True)
  direction = np.array([0.5, -1.0], np.float32)
  value, tangent, largest = jvp(W0, data, direction)
  assert value == pytest.approx(float(expected_loss), rel=RTOL)
  assert tangent == pytest.approx(expected_grad @ direction, rel=RTOL)
  np.testing.assert_allclose(largest, 3.0 * W0)
  # The clients return the loss's tangent, not one for the aux member
  # (a structural zero in its place), and the aux's federated_max, which
  # has no derivative rule, is not differentiated.
  (client_map,) = [n for n in jvp.program.nodes
                   if n.primitive.name == 'federated_map']
  assert str(client_map.output.member) == (
      '<<float32,float32[2]>,<float32,float32>>')
  with pytest.raises(tff_fad.NotDifferentiableError, match='federated_max'):
    tff_fad.jvp(loss_with_aux_from_the_same_call)


@pytest.mark.parametrize('mode', ('reverse', 'reverse_recompute'))
def test_stop_gradient_and_has_aux_in_reverse_mode(mode):
  data = _client_data()
  expected_loss, expected_grad = _centralized(W0, data)
  (value, trained), gradient = tff_fad.value_and_grad(
      loss_and_trained_models, mode=mode, has_aux=True)(W0, data)
  assert value == pytest.approx(expected_loss, rel=RTOL)
  np.testing.assert_allclose(gradient, expected_grad, rtol=RTOL)
  assert len(trained) == 3
  gradient_only, trained_again = tff_fad.grad(
      loss_and_trained_models, mode=mode, has_aux=True)(W0, data)
  np.testing.assert_allclose(gradient_only, expected_grad, rtol=RTOL)
  np.testing.assert_allclose(trained_again[2], trained[2])
  ct, _ = tff_fad.vjp(loss_and_trained_models, mode=mode, has_aux=True)(
      W0, data, 2.0)
  np.testing.assert_allclose(ct, 2 * expected_grad, rtol=RTOL)


def test_without_stop_gradient_the_dataset_loop_is_reported():
  @tff_fad.federated_computation(W, DATASETS)
  def trains_on_active_model(w, data):
    return tff_fad.federated_mean(tff_fad.federated_map(
        local_training, (tff_fad.federated_broadcast(w), data)))

  with pytest.raises(tff_fad.NotDifferentiableError,
                     match=r'federated_map\(local_training\) takes a '
                           r'tf.data.Dataset'):
    tff_fad.jvp(trains_on_active_model)


def test_has_aux_needs_a_pair():
  with pytest.raises(tff_fad.FederatedADError,
                     match='has_aux=True needs federated_dataset_loss to '
                           'return a pair'):
    tff_fad.jvp(federated_dataset_loss, has_aux=True)


def test_stop_gradient_emits_no_intrinsic():
  @tff_fad.federated_computation(W)
  def stopped(w):
    return tff_fad.federated_apply(
        lambda a, b: tf.reduce_sum(a * b), (w, tff_fad.stop_gradient(w)))

  # d/dw sum(w * stop(w)) = stop(w) = w.
  np.testing.assert_allclose(tff_fad.grad(stopped)(W0), W0)
  np.testing.assert_allclose(tff_fad.grad(stopped, mode='forward')(W0), W0)
  assert set(cost.intrinsics_used(stopped)) == {'federated_apply',
                                                'federated_zip_at_server'}
