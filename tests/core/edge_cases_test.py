"""Exact float64 weighted means, zero clients, and errors that name the cause.

Each case reproduces a fault reported against the core (issue 15) before the
fix: float64 weights were cast to float32 in every derivative rule of the
weighted mean, reverse mode gave a zero gradient where the primal was NaN,
malformed arguments surfaced 26 frames deep in TFF, and a secure sum outside
its simulation context failed with a gRPC error.
"""

import collections
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad import aggregation

MODES = tff_fad.MODES
REVERSE_MODES = ('reverse', 'reverse_recompute')

# ----------------------------------------------------------------------------
# Float64 weighted mean: derivatives exact to float64 rounding.

VEC64 = tff.FederatedType(tff.TensorType(np.float64, [2]), tff.CLIENTS)
WEIGHT64 = tff.FederatedType(np.float64, tff.CLIENTS)
SCALE64 = tff.FederatedType(np.float64, tff.SERVER)
TARGET = np.array([0.5, -1.0])
XS = [np.array(v) for v in ([1.0, 2.0], [3.0, -1.0], [-2.0, 0.5])]
# Weights whose sum and ratios are not representable in float32.
WS = [np.float64(v) for v in (1.0 / 3.0, 2.5 + 1e-9, 0.7)]


def distance_to_target(m):
  return tf.reduce_sum((m - TARGET) ** 2)


@tff_fad.federated_computation(VEC64, WEIGHT64)
def weighted_objective(x, w):
  return tff_fad.federated_apply(distance_to_target,
                                 tff_fad.federated_mean(x, weight=w))


@tff_fad.federated_computation(VEC64, WEIGHT64, SCALE64)
def weights_from_a_broadcast(x, w, s):
  # Client weights w_i * exp(s w_i) depend on a server value s.
  weights = tff_fad.federated_map(lambda w, s: w * tf.exp(s * w),
                                  (w, tff_fad.federated_broadcast(s)))
  return tff_fad.federated_apply(distance_to_target,
                                 tff_fad.federated_mean(x, weight=weights))


def _central(xs, ws, s=None):
  xs, ws = tf.Variable(np.stack(xs)), tf.Variable(np.array(ws))
  s = tf.Variable(np.float64(0.0 if s is None else s))
  with tf.GradientTape() as tape:
    weights = ws * tf.exp(s * ws)
    mean = tf.reduce_sum(weights[:, None] * xs, 0) / tf.reduce_sum(weights)
    loss = distance_to_target(mean)
  gx, gw, gs = tape.gradient(loss, [xs, ws, s])
  return loss.numpy(), gx.numpy(), gw.numpy(), gs.numpy()


RTOL64 = 1e-13


@pytest.mark.parametrize('mode', REVERSE_MODES)
@pytest.mark.parametrize('wrt', ['x', 'w', ('x', 'w')])
def test_float64_weighted_mean_gradients_are_exact(mode, wrt):
  loss, gx, gw, _ = _central(XS, WS)
  value, grads = tff_fad.value_and_grad(weighted_objective, wrt=wrt,
                                        mode=mode)(XS, WS)
  assert value == pytest.approx(loss, rel=RTOL64)
  expected = {'x': gx, 'w': gw}
  grads = grads if isinstance(wrt, tuple) else (grads,)
  for name, g in zip(wrt if isinstance(wrt, tuple) else (wrt,), grads):
    np.testing.assert_allclose(np.array(g), expected[name], rtol=RTOL64)


@pytest.mark.parametrize('wrt', ['x', 'w', ('x', 'w')])
def test_float64_weighted_mean_jvp_is_exact(wrt):
  loss, gx, gw, _ = _central(XS, WS)
  rng = np.random.default_rng(0)
  tx = [rng.normal(size=2) for _ in XS]
  tw = [np.float64(v) for v in rng.normal(size=3)]
  names = wrt if isinstance(wrt, tuple) else (wrt,)
  tangents = [{'x': tx, 'w': tw}[n] for n in names]
  value, tangent = tff_fad.jvp(weighted_objective, wrt=wrt)(XS, WS, *tangents)
  expected = sum(float(np.sum(np.stack({'x': gx, 'w': gw}[n]) *
                              np.stack(t)))
                 for n, t in zip(names, tangents))
  assert value == pytest.approx(loss, rel=RTOL64)
  assert tangent == pytest.approx(expected, rel=RTOL64)


@pytest.mark.parametrize('mode', MODES)
def test_float64_weights_from_a_broadcast_value(mode):
  s = 0.3
  loss, _, _, gs = _central(XS, WS, s)
  value, grad = tff_fad.value_and_grad(weights_from_a_broadcast, wrt='s',
                                       mode=mode)(XS, WS, s)
  assert value == pytest.approx(loss, rel=RTOL64)
  assert grad == pytest.approx(gs, rel=RTOL64)
  # And against central finite differences (float64).
  eps = 1e-6
  fd = (weights_from_a_broadcast(XS, WS, s + eps) -
        weights_from_a_broadcast(XS, WS, s - eps)) / (2 * eps)
  assert grad == pytest.approx(fd, rel=1e-7)


def test_float64_weighted_mean_batched_directions():
  _, _, gw, _ = _central(XS, WS)
  directions = [np.array([1.0, 0.0, -2.0]), np.array([0.0, 1.0, 0.5]),
                np.array([0.25, 0.25, 0.25])]
  per_client = [np.array([d[i] for d in directions]) for i in range(3)]
  _, tangents = tff_fad.jvp(weighted_objective, wrt='w', num_directions=3)(
      XS, WS, per_client)
  np.testing.assert_allclose(tangents, [gw @ d for d in directions],
                             rtol=RTOL64)


# ----------------------------------------------------------------------------
# Zero clients: the mean is 0/0, so every mode gives NaN.

W_TYPE = tff.FederatedType(tff.TensorType(np.float32, [2]), tff.SERVER)
EXAMPLE = collections.OrderedDict(
    x=tff.TensorType(np.float32, [2]), y=tff.TensorType(np.float32))


@tff_fad.federated_computation(W_TYPE, tff.FederatedType(EXAMPLE, tff.CLIENTS))
def loss(w, data):
  per_client = tff_fad.federated_map(
      lambda w, e: 0.5 * (tf.reduce_sum(w * e['x']) - e['y']) ** 2,
      (tff_fad.federated_broadcast(w), data))
  return tff_fad.federated_mean(per_client)


W0 = np.array([2.0, -1.0], np.float32)


@pytest.mark.parametrize('mode', MODES)
def test_zero_clients_give_nan_in_every_mode(mode):
  assert np.isnan(loss(W0, []))
  value, grad = tff_fad.value_and_grad(loss, mode=mode)(W0, [])
  assert np.isnan(value)
  assert np.all(np.isnan(grad)), grad


def test_zero_clients_give_nan_tangents():
  value, tangent = tff_fad.jvp(loss)(W0, [], np.ones(2, np.float32))
  assert np.isnan(value) and np.isnan(tangent)


@pytest.mark.parametrize('mode', MODES)
def test_clients_present_are_not_poisoned(mode):
  data = [collections.OrderedDict(x=np.array([1.0, 2.0], np.float32),
                                  y=np.float32(1.0))]
  _, grad = tff_fad.value_and_grad(loss, mode=mode)(W0, data)
  np.testing.assert_allclose(grad, [-1.0, -2.0], rtol=1e-6)


# ----------------------------------------------------------------------------
# Malformed arguments, tangents and cotangents: refused before execution.

GOOD_DATA = [collections.OrderedDict(x=np.ones(2, np.float32),
                                     y=np.float32(0.0))]


def test_wrong_shape_names_the_argument_and_both_types():
  with pytest.raises(tff_fad.FederatedADError,
                     match=r"loss: argument 'w' must have type float32\[2\] "
                           r"\(shape \[2\]\), found float32\[3\]"):
    loss(np.zeros(3, np.float32), GOOD_DATA)


def test_wrong_tangent_shape_names_the_tangent():
  with pytest.raises(tff_fad.FederatedADError,
                     match=r"argument 'w_tangent' must have type float32\[2\]"):
    tff_fad.jvp(loss)(W0, GOOD_DATA, np.ones(3, np.float32))


def test_wrong_cotangent_names_the_cotangent():
  with pytest.raises(tff_fad.FederatedADError,
                     match=r"argument 'output_cotangent' must have type "
                           r"float32 \(shape \[\]\), found float64\[2\]"):
    tff_fad.vjp(loss)(W0, GOOD_DATA, np.ones(2))


def test_wrong_client_structure_names_the_client_and_key():
  bad = [collections.OrderedDict(x=np.ones(2, np.float32))]
  with pytest.raises(tff_fad.FederatedADError,
                     match=r"argument 'data' \(client 0\) must have the "
                           r"structure .*keys \['x', 'y'\]"):
    loss(W0, bad)
  with pytest.raises(tff_fad.FederatedADError,
                     match=r"argument 'data' must be a list with one value "
                           'per client'):
    loss(W0, GOOD_DATA[0])


def test_wrong_number_of_arguments():
  with pytest.raises(tff_fad.FederatedADError,
                     match=r"takes 3 argument\(s\) \['w', 'data', "
                           r"'w_tangent'\]; it was called with 2"):
    tff_fad.jvp(loss)(W0, GOOD_DATA)


# ----------------------------------------------------------------------------
# A secure sum outside its simulation context.

@tff_fad.federated_computation(
    tff.FederatedType(np.float32, tff.SERVER),
    tff.FederatedType(tff.TensorType(np.float32, [2]), tff.CLIENTS))
def secure_total(w, d):
  products = tff_fad.federated_map(lambda w, d: w * d,
                                   (tff_fad.federated_broadcast(w), d))
  return aggregation.federated_secure_sum(products, clip_range=(-10, 10),
                                          num_clients_bound=10)


def test_secure_sum_outside_the_simulation_context_names_it():
  data = [np.array([1.0, 2.0], np.float32)]
  with pytest.raises(tff_fad.FederatedADError,
                     match='secure_simulation_context'):
    secure_total(2.0, data)
  with aggregation.secure_simulation_context():
    np.testing.assert_allclose(secure_total(2.0, data), [2.0, 4.0],
                               atol=1e-2)


def test_privacy_report_refuses_a_derivative_that_cannot_be_built():
  # No cotangent_clip_range: vjp refuses, so the report must too.
  with pytest.raises(tff_fad.NotDifferentiableError,
                     match='cotangent_clip_range'):
    tff_fad.vjp(secure_total)
  with pytest.raises(tff_fad.NotDifferentiableError,
                     match='cotangent_clip_range'):
    aggregation.privacy_report(secure_total, mode='reverse',
                               sampling_rate=1.0, rounds=1, delta=1e-5)


# ----------------------------------------------------------------------------
# Non-differentiable local ops on the derivative path: a warning naming them.

def _program_through(local_fn):
  @tff_fad.federated_computation(W_TYPE, tff.FederatedType(EXAMPLE,
                                                           tff.CLIENTS))
  def program(w, data):
    return tff_fad.federated_mean(tff_fad.federated_map(
        local_fn, (tff_fad.federated_broadcast(w), data)))
  return program


def through_argmax(w, e):
  return tf.cast(tf.argmax(w * e['x']), tf.float32) * e['y']


def through_integer_cast(w, e):
  return tf.cast(tf.cast(w[0] * 10.0, tf.int32), tf.float32) + e['y']


@pytest.mark.parametrize('fn, op', [(through_argmax, 'ArgMax'),
                                    (through_integer_cast, 'Cast')])
@pytest.mark.parametrize('transform', ['jvp', 'grad'])
def test_zero_derivative_ops_are_named_in_a_warning(fn, op, transform):
  program = _program_through(fn)
  with pytest.warns(tff_fad.ZeroDerivativeWarning,
                    match=rf'derivative of {fn.__name__} does not flow '
                          rf'through {op}'):
    getattr(tff_fad, transform)(program).type_signature  # Traces the TF.


def test_shape_ops_do_not_warn():
  def uses_shape(w, e):
    n = tf.cast(tf.shape(w)[0], tf.float32)
    return tf.reduce_sum(w * e['x']) / n
  program = _program_through(uses_shape)
  with warnings.catch_warnings():
    warnings.simplefilter('error', tff_fad.ZeroDerivativeWarning)
    tff_fad.grad(program).type_signature  # pylint: disable=expression-not-assigned
