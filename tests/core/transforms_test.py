"""Derivatives of federated programs against centralized TF and by hand."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad.core import cost

MODES = tff_fad.MODES
REVERSE_MODES = ('reverse', 'reverse_recompute')
RTOL = 1e-5

# ----------------------------------------------------------------------------
# Linear regression: model w = [2, -1], three clients with one example each.
#   x = [1, 2], [3, -4], [-7, 6];  targets y = 1, 2, -3 (our choice).
#   residuals r = x.w - y = [-1, 8, -17]
#   loss = mean(r^2 / 2) = (0.5 + 32 + 144.5) / 3 = 59
#   grad = mean(r x) = [(-1 + 24 + 119) / 3, (-2 - 32 - 102) / 3]
#        = [142/3, -136/3]

W_TYPE = tff.FederatedType(tff.TensorType(np.float32, [2]), tff.SERVER)
EXAMPLE = collections.OrderedDict(
    x=tff.TensorType(np.float32, [2]), y=tff.TensorType(np.float32))
DATA_TYPE = tff.FederatedType(EXAMPLE, tff.CLIENTS)
LINREG_W = np.array([2.0, -1.0], np.float32)
LINREG_DATA = [
    collections.OrderedDict(x=np.array(x, np.float32), y=np.float32(y))
    for x, y in [([1, 2], 1.0), ([3, -4], 2.0), ([-7, 6], -3.0)]
]
LINREG_LOSS = 59.0
LINREG_GRAD = np.array([142 / 3, -136 / 3], np.float32)


def squared_error(w, example):
  return 0.5 * (tf.reduce_sum(w * example['x']) - example['y']) ** 2


@tff_fad.federated_computation(W_TYPE, DATA_TYPE)
def linreg_loss(w, data):
  w_at_clients = tff_fad.federated_broadcast(w)
  per_client = tff_fad.federated_map(squared_error, (w_at_clients, data))
  return tff_fad.federated_mean(per_client)


def test_primal_runs_on_tff_runtime():
  assert linreg_loss.type_signature.is_equivalent_to(
      tff.FunctionType(
          tff.StructType([('w', W_TYPE), ('data', DATA_TYPE)]),
          tff.FederatedType(np.float32, tff.SERVER)))
  assert isinstance(linreg_loss.primal, tff.Computation)
  assert linreg_loss(LINREG_W, LINREG_DATA) == pytest.approx(LINREG_LOSS)


@pytest.mark.parametrize('mode', MODES)
def test_linear_regression_gradient_by_hand(mode):
  value, gradient = tff_fad.value_and_grad(linreg_loss, mode=mode)(
      LINREG_W, LINREG_DATA)
  assert value == pytest.approx(LINREG_LOSS, rel=RTOL)
  np.testing.assert_allclose(gradient, LINREG_GRAD, rtol=RTOL)


def test_jvp_signature_and_value():
  jvp = tff_fad.jvp(linreg_loss)
  assert str(jvp.type_signature) == (
      '(<w=float32[2]@SERVER,data={<x=float32[2],y=float32>}@CLIENTS,'
      'w_tangent=float32[2]@SERVER> -> <float32@SERVER,float32@SERVER>)')
  tangent = np.array([0.5, 2.0], np.float32)
  value, value_tangent = jvp(LINREG_W, LINREG_DATA, tangent)
  assert value == pytest.approx(LINREG_LOSS)
  assert value_tangent == pytest.approx(float(LINREG_GRAD @ tangent), rel=RTOL)


def test_batched_jvp_equals_one_direction_at_a_time():
  directions = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, -2.0]], np.float32)
  batched = tff_fad.jvp(linreg_loss, num_directions=3)
  assert str(batched.type_signature.parameter[2]) == 'float32[3,2]@SERVER'
  _, tangents = batched(LINREG_W, LINREG_DATA, directions)
  single = tff_fad.jvp(linreg_loss)
  expected = [single(LINREG_W, LINREG_DATA, d)[1] for d in directions]
  np.testing.assert_allclose(tangents, expected, rtol=RTOL)


@pytest.mark.parametrize('mode', REVERSE_MODES)
def test_vjp_scales_with_output_cotangent(mode):
  vjp = tff_fad.vjp(linreg_loss, mode=mode)
  assert str(vjp.type_signature) == (
      '(<w=float32[2]@SERVER,data={<x=float32[2],y=float32>}@CLIENTS,'
      'output_cotangent=float32@SERVER> -> float32[2]@SERVER)')
  np.testing.assert_allclose(
      vjp(LINREG_W, LINREG_DATA, -2.0), -2.0 * LINREG_GRAD, rtol=RTOL)


@pytest.mark.parametrize('mode', REVERSE_MODES)
def test_gradient_with_respect_to_client_data_is_per_client(mode):
  grad = tff_fad.grad(linreg_loss, wrt='data', mode=mode)
  assert str(grad.type_signature.result) == '{<x=float32[2],y=float32>}@CLIENTS'
  per_client = grad(LINREG_W, LINREG_DATA)
  assert len(per_client) == 3
  for example, g in zip(LINREG_DATA, per_client):
    r = float(LINREG_W @ example['x'] - example['y'])
    np.testing.assert_allclose(g['x'], r * LINREG_W / 3, rtol=RTOL)
    assert g['y'] == pytest.approx(-r / 3, rel=RTOL)


# ----------------------------------------------------------------------------
# Sum of a broadcast with 3 clients: value 3x, derivative 3.

@tff_fad.federated_computation(tff.FederatedType(np.float32, tff.SERVER))
def sum_of_broadcast(x):
  return tff_fad.federated_sum(tff_fad.federated_broadcast(x))


@pytest.fixture
def three_clients_by_default():
  tff.backends.native.set_sync_local_cpp_execution_context(
      default_num_clients=3)
  yield
  tff.backends.native.set_sync_local_cpp_execution_context()


@pytest.mark.parametrize('mode', MODES)
def test_sum_of_broadcast_known_answer(three_clients_by_default, mode):
  del three_clients_by_default
  assert sum_of_broadcast(2.0) == 6.0
  assert tff_fad.value_and_grad(sum_of_broadcast, mode=mode)(2.0) == (6.0, 3.0)
  assert tff_fad.jvp(sum_of_broadcast)(2.0, 1.0) == (6.0, 3.0)


# ----------------------------------------------------------------------------
# A small MLP with nested parameters, against centralized TF on pooled data.

MLP_PARAMS = collections.OrderedDict(
    hidden=collections.OrderedDict(
        kernel=tff.TensorType(np.float32, [3, 4]),
        bias=tff.TensorType(np.float32, [4])),
    out=tff.TensorType(np.float32, [4]))
MLP_DATA = collections.OrderedDict(
    x=tff.TensorType(np.float32, [5, 3]), y=tff.TensorType(np.float32, [5]))


def mlp_loss(params, batch):
  hidden = tf.tanh(batch['x'] @ params['hidden']['kernel'] +
                   params['hidden']['bias'])
  prediction = tf.reduce_sum(hidden * params['out'], axis=-1)
  return tf.reduce_mean((prediction - batch['y']) ** 2)


@tff_fad.federated_computation(
    tff.FederatedType(MLP_PARAMS, tff.SERVER),
    tff.FederatedType(MLP_DATA, tff.CLIENTS))
def mlp_federated_loss(params, data):
  return tff_fad.federated_mean(
      tff_fad.federated_map(mlp_loss,
                            (tff_fad.federated_broadcast(params), data)))


def _mlp_values(seed=0, num_clients=4):
  rng = np.random.default_rng(seed)
  params = collections.OrderedDict(
      hidden=collections.OrderedDict(
          kernel=rng.normal(size=(3, 4)).astype(np.float32),
          bias=rng.normal(size=(4,)).astype(np.float32)),
      out=rng.normal(size=(4,)).astype(np.float32))
  data = [
      collections.OrderedDict(
          x=rng.normal(size=(5, 3)).astype(np.float32),
          y=rng.normal(size=(5,)).astype(np.float32))
      for _ in range(num_clients)
  ]
  return params, data


def _centralized_mlp_gradient(params, data):
  params = tf.nest.map_structure(tf.Variable, params)
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean([mlp_loss(params, batch) for batch in data])
  return loss.numpy(), tf.nest.map_structure(
      lambda g: g.numpy(), tape.gradient(loss, params))


@pytest.mark.parametrize('mode', MODES)
def test_nested_parameters_match_centralized_gradient(mode):
  params, data = _mlp_values()
  expected_loss, expected_grad = _centralized_mlp_gradient(params, data)
  value, gradient = tff_fad.value_and_grad(mlp_federated_loss, mode=mode)(
      params, data)
  assert value == pytest.approx(expected_loss, rel=RTOL)
  tf.nest.map_structure(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6),
      gradient, expected_grad)


# ----------------------------------------------------------------------------
# Two FedAvg rounds then an evaluation, differentiated w.r.t. the server
# learning rate: derivatives flow through communication, local training
# (itself using a GradientTape) and the server update.

LR_TYPE = tff.FederatedType(np.float32, tff.SERVER)
CLIENT_LR = 0.05
LOCAL_STEPS = 2


def local_training_delta(w, batch):
  """Two local gradient steps; returns the model delta (initial - final)."""
  local = w
  for _ in range(LOCAL_STEPS):
    with tf.GradientTape() as tape:
      tape.watch(local)
      loss = mlp_loss(local, batch)
    grads = tape.gradient(loss, local)
    local = tf.nest.map_structure(lambda p, g: p - CLIENT_LR * g, local, grads)
  return tf.nest.map_structure(tf.subtract, w, local)


def server_update(w, server_lr, mean_delta):
  return tf.nest.map_structure(lambda p, d: p - server_lr * d, w, mean_delta)


@tff_fad.federated_computation(
    tff.FederatedType(MLP_PARAMS, tff.SERVER), LR_TYPE,
    tff.FederatedType(MLP_DATA, tff.CLIENTS))
def two_fedavg_rounds_then_loss(w, server_lr, data):
  for _ in range(2):
    deltas = tff_fad.federated_map(
        local_training_delta, (tff_fad.federated_broadcast(w), data))
    w = tff_fad.federated_apply(
        server_update, (w, server_lr, tff_fad.federated_mean(deltas)))
  return mlp_federated_loss(w, data)  # A tff_fad program, inlined.


def _centralized_fedavg(params, server_lr, data):
  lr = tf.Variable(server_lr)
  with tf.GradientTape() as tape:
    w = tf.nest.map_structure(tf.constant, params)
    for _ in range(2):
      deltas = [local_training_delta(w, batch) for batch in data]
      mean_delta = tf.nest.map_structure(
          lambda *d: tf.reduce_mean(tf.stack(d), axis=0), *deltas)
      w = server_update(w, lr, mean_delta)
    loss = tf.reduce_mean([mlp_loss(w, batch) for batch in data])
  return loss.numpy(), tape.gradient(loss, lr).numpy()


@pytest.mark.parametrize('mode', MODES)
def test_multi_round_fedavg_hypergradient_matches_centralized(mode):
  params, data = _mlp_values(seed=1, num_clients=3)
  expected_loss, expected_grad = _centralized_fedavg(params, 0.7, data)
  value, hypergradient = tff_fad.value_and_grad(
      two_fedavg_rounds_then_loss, wrt='server_lr', mode=mode)(
          params, 0.7, data)
  assert value == pytest.approx(expected_loss, rel=RTOL)
  assert hypergradient == pytest.approx(expected_grad, rel=1e-4)


def test_multi_round_hypergradient_matches_finite_differences():
  params, data = _mlp_values(seed=1, num_clients=3)
  eps = 1e-2
  plus = two_fedavg_rounds_then_loss(params, 0.7 + eps, data)
  minus = two_fedavg_rounds_then_loss(params, 0.7 - eps, data)
  finite_difference = (plus - minus) / (2 * eps)
  hypergradient = tff_fad.grad(two_fedavg_rounds_then_loss, wrt=1)(
      params, 0.7, data)
  assert hypergradient == pytest.approx(finite_difference, rel=1e-2)


# ----------------------------------------------------------------------------
# Weighted mean: derivatives w.r.t. values and (client-placed) weights.

VEC = tff.FederatedType(tff.TensorType(np.float32, [2]), tff.CLIENTS)
WEIGHT = tff.FederatedType(np.float32, tff.CLIENTS)
TARGET = np.array([0.5, -1.0], np.float32)


def distance_to_target(m):
  return tf.reduce_sum((m - TARGET) ** 2)


@tff_fad.federated_computation(VEC, WEIGHT)
def weighted_objective(x, w):
  return tff_fad.federated_apply(distance_to_target,
                                 tff_fad.federated_mean(x, weight=w))


WX = [np.array(v, np.float32) for v in ([1.0, 2.0], [3.0, -1.0], [-2.0, 0.5])]
WW = [np.float32(v) for v in (1.0, 2.5, 0.7)]


def _centralized_weighted(xs, ws):
  xs, ws = tf.Variable(np.stack(xs)), tf.Variable(np.array(ws))
  with tf.GradientTape() as tape:
    mean = tf.reduce_sum(ws[:, None] * xs, 0) / tf.reduce_sum(ws)
    loss = distance_to_target(mean)
  gx, gw = tape.gradient(loss, [xs, ws])
  return loss.numpy(), gx.numpy(), gw.numpy()


@pytest.mark.parametrize('mode', REVERSE_MODES)
def test_weighted_mean_gradients_wrt_values_and_weights(mode):
  loss, gx, gw = _centralized_weighted(WX, WW)
  value, (grad_x, grad_w) = tff_fad.value_and_grad(
      weighted_objective, wrt=('x', 'w'), mode=mode)(WX, WW)
  assert value == pytest.approx(loss, rel=RTOL)
  np.testing.assert_allclose(np.stack(grad_x), gx, rtol=RTOL)
  np.testing.assert_allclose(np.array(grad_w), gw, rtol=RTOL)


def test_weighted_mean_forward_mode_matches_reverse_by_duality():
  # <grad, v> == jvp(v): forward and reverse agree for any direction v.
  _, gx, gw = _centralized_weighted(WX, WW)
  rng = np.random.default_rng(3)
  vx = [rng.normal(size=2).astype(np.float32) for _ in WX]
  vw = [np.float32(rng.normal()) for _ in WW]
  _, tangent = tff_fad.jvp(weighted_objective, wrt=(0, 1))(WX, WW, vx, vw)
  expected = float(np.sum(gx * np.stack(vx)) + np.sum(gw * np.array(vw)))
  assert tangent == pytest.approx(expected, rel=RTOL)
  # Weights alone (values held constant) take the packed-sum path too.
  _, tangent_w = tff_fad.jvp(weighted_objective, wrt='w')(WX, WW, vw)
  assert tangent_w == pytest.approx(float(np.sum(gw * np.array(vw))), rel=RTOL)


def test_weighted_mean_batched_directions():
  _, gx, gw = _centralized_weighted(WX, WW)
  directions = [np.array([1.0, 0.0, -1.0], np.float32) * v for v in WW]
  _, tangents = tff_fad.jvp(weighted_objective, wrt='w', num_directions=3)(
      WX, WW, directions)
  expected = [float(np.sum(gw * np.array([d[j] for d in directions])))
              for j in range(3)]
  np.testing.assert_allclose(tangents, expected, rtol=RTOL, atol=1e-6)


# ----------------------------------------------------------------------------
# Closure: derivative programs contain only the allowed intrinsics.

CLOSED_SET = {
    'federated_broadcast', 'federated_map', 'federated_apply',
    'federated_sum', 'federated_mean', 'federated_weighted_mean',
    'federated_zip_at_clients', 'federated_zip_at_server',
}


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('program', [
    linreg_loss, mlp_federated_loss, two_fedavg_rounds_then_loss])
def test_derivative_programs_are_closed(program, mode):
  wrt = 'server_lr' if program is two_fedavg_rounds_then_loss else 0
  derivative = tff_fad.value_and_grad(program, wrt=wrt, mode=mode)
  used = set(cost.intrinsics_used(derivative))
  assert used <= CLOSED_SET, used - CLOSED_SET
  assert {'federated_broadcast', 'federated_map'} <= used
  assert used & {'federated_sum', 'federated_mean'}


def test_weighted_mean_derivatives_are_closed():
  for comp in (tff_fad.jvp(weighted_objective, wrt=(0, 1)),
               tff_fad.vjp(weighted_objective, wrt=(0, 1)),
               tff_fad.vjp(weighted_objective, wrt=1,
                           mode='reverse_recompute')):
    used = set(cost.intrinsics_used(comp))
    assert used <= CLOSED_SET, used - CLOSED_SET


# ----------------------------------------------------------------------------
# Structured outputs and composition.

@tff_fad.federated_computation(W_TYPE, DATA_TYPE)
def loss_and_per_client(w, data):
  per_client = tff_fad.federated_map(
      squared_error, (tff_fad.federated_broadcast(w), data))
  return collections.OrderedDict(
      mean=tff_fad.federated_mean(per_client), per_client=per_client)


@pytest.mark.parametrize('mode', REVERSE_MODES)
def test_vjp_of_structured_output(mode):
  vjp = tff_fad.vjp(loss_and_per_client, mode=mode)
  # Cotangent 1 on the mean, and 1 on client 0's loss only.
  ct = collections.OrderedDict(mean=1.0, per_client=[1.0, 0.0, 0.0])
  r0 = float(LINREG_W @ LINREG_DATA[0]['x'] - LINREG_DATA[0]['y'])
  expected = LINREG_GRAD + r0 * LINREG_DATA[0]['x']
  np.testing.assert_allclose(vjp(LINREG_W, LINREG_DATA, ct), expected,
                             rtol=RTOL)


def test_jvp_of_structured_output():
  value, tangent = tff_fad.jvp(loss_and_per_client)(
      LINREG_W, LINREG_DATA, np.array([1.0, 0.0], np.float32))
  assert value['mean'] == pytest.approx(LINREG_LOSS)
  assert tangent['mean'] == pytest.approx(LINREG_GRAD[0], rel=RTOL)
  residuals = [float(LINREG_W @ e['x'] - e['y']) for e in LINREG_DATA]
  np.testing.assert_allclose(
      tangent['per_client'],
      [r * e['x'][0] for r, e in zip(residuals, LINREG_DATA)], rtol=RTOL)


def test_unused_argument_gets_zero_gradient():
  @tff_fad.federated_computation(W_TYPE, LR_TYPE, DATA_TYPE)
  def ignores_lr(w, lr, data):
    del lr
    return linreg_loss(w, data)

  grads = tff_fad.grad(ignores_lr, wrt=('lr', 'w'))(LINREG_W, 0.3, LINREG_DATA)
  assert grads[0] == 0.0
  np.testing.assert_allclose(grads[1], LINREG_GRAD, rtol=RTOL)


def test_indexing_a_structured_value_selects_a_member():
  @tff_fad.federated_computation(W_TYPE, DATA_TYPE)
  def mean_target_times_w0(w, data):
    targets = tff_fad.federated_mean(data['y'])
    return tff_fad.federated_apply(lambda t, w: t * w[0], (targets, w))

  assert tff_fad.grad(mean_target_times_w0)(LINREG_W, LINREG_DATA) == (
      pytest.approx([0.0, 0.0]))
  np.testing.assert_allclose(
      tff_fad.grad(mean_target_times_w0, wrt='data')(
          LINREG_W, LINREG_DATA)[1]['y'], LINREG_W[0] / 3, rtol=RTOL)
