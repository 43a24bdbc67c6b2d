"""Second order across the communication boundary: transforms compose.

Every transform returns a tff_fad program, so a derivative program can be
differentiated again. Hessian-vector products and second derivatives are
checked in float64 against a centralized TF double tape and against finite
differences of the first derivative, in every mode pairing, and each
second-order program is checked to use only broadcast, map/apply and
sum/mean (closure).
"""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad.core import cost
from tff_fad.core import primitives

MODES = tff_fad.MODES
REVERSE_MODES = ('reverse', 'reverse_recompute')
# Float64 throughout: only rounding separates the federated and central sums.
RTOL = 1e-9

# ----------------------------------------------------------------------------
# The README's federated least squares, in float64: H = mean_i x_i x_i^T.

W_TYPE = tff.FederatedType(tff.TensorType(np.float64, [2]), tff.SERVER)
EXAMPLE = collections.OrderedDict(
    x=tff.TensorType(np.float64, [2]), y=tff.TensorType(np.float64))
W = np.array([2.0, -1.0])
DATA = [
    collections.OrderedDict(x=np.array(x, np.float64), y=np.float64(y))
    for x, y in [([1, 2], 1.0), ([3, -4], 2.0), ([-7, 6], -3.0)]
]
V = np.array([0.5, 2.0])
U = np.array([-1.0, 3.0])


def squared_error(w, example):
  return 0.5 * (tf.reduce_sum(w * example['x']) - example['y']) ** 2


@tff_fad.federated_computation(W_TYPE, tff.FederatedType(EXAMPLE, tff.CLIENTS))
def least_squares(w, data):
  return tff_fad.federated_mean(
      tff_fad.federated_map(squared_error,
                            (tff_fad.federated_broadcast(w), data)))


def _hessian_of_least_squares():
  return np.mean([np.outer(d['x'], d['x']) for d in DATA], axis=0)


def _hvp_programs(comp, wrt):
  """Every way to build a Hessian-vector product, by name.

  Returns (name, hvp) pairs; `hvp(primals, v)` returns H v for the argument
  `wrt` of a scalar `comp`.
  """
  programs = []
  for mode in MODES:
    # Forward over the gradient (forward-over-reverse for reverse modes).
    hvp = tff_fad.jvp(tff_fad.grad(comp, wrt=wrt, mode=mode), wrt=wrt)
    programs.append((f'jvp(grad[{mode}])', hvp,
                     lambda p, primals, v: p(*primals, v)[1]))
  for mode in REVERSE_MODES:
    # Reverse over forward: d/dw <grad f(w), v> with the tangent v held.
    hvp = tff_fad.vjp(tff_fad.jvp(comp, wrt=wrt), wrt=wrt, mode=mode)
    programs.append((f'vjp[{mode}](jvp)', hvp,
                     lambda p, primals, v: p(*primals, v, (0.0, 1.0))))
  return programs


_LEAST_SQUARES_HVPS = _hvp_programs(least_squares, 'w')


@pytest.mark.parametrize('name, hvp, call', _LEAST_SQUARES_HVPS,
                         ids=[n for n, _, _ in _LEAST_SQUARES_HVPS])
def test_least_squares_hvp_is_exact(name, hvp, call):
  del name
  np.testing.assert_allclose(call(hvp, (W, DATA), V),
                             _hessian_of_least_squares() @ V, rtol=RTOL)


@pytest.mark.parametrize('name, hvp, call', _LEAST_SQUARES_HVPS,
                         ids=[n for n, _, _ in _LEAST_SQUARES_HVPS])
def test_second_order_programs_use_only_federated_ad_primitives(
    name, hvp, call):
  del name, call
  used = set(cost.intrinsics_used(hvp))
  assert used <= primitives.ALLOWED_INTRINSICS, used
  assert 'federated_broadcast' in used
  assert used & {'federated_sum', 'federated_mean'}


def test_second_directional_derivative_by_forward_over_forward():
  jvp_of_jvp = tff_fad.jvp(tff_fad.jvp(least_squares, wrt='w'), wrt='w')
  (value, tangent), (_, second) = jvp_of_jvp(W, DATA, V, U)
  assert tangent == pytest.approx(
      float(np.mean([(W @ d['x'] - d['y']) * (d['x'] @ V) for d in DATA])),
      rel=RTOL)
  assert value == pytest.approx(least_squares(W, DATA), rel=RTOL)
  assert second == pytest.approx(U @ _hessian_of_least_squares() @ V,
                                 rel=RTOL)


def test_communication_cost_of_hvp_programs():
  # Forward over reverse: the gradient's two sweeps each carry a tangent.
  primal = cost.communication_cost(least_squares, num_clients=10)
  gradient = cost.communication_cost(
      tff_fad.grad(least_squares, mode='reverse'), num_clients=10)
  hvp = cost.communication_cost(
      tff_fad.jvp(tff_fad.grad(least_squares, mode='reverse')),
      num_clients=10)
  assert hvp.round_trips == gradient.round_trips == 2 * primal.round_trips
  assert hvp.server_to_client_bytes_per_client >= (
      2 * gradient.server_to_client_bytes_per_client - 16)


# ----------------------------------------------------------------------------
# Two FedAvg rounds then the loss, w.r.t. the initial model (HVP) and w.r.t.
# the server learning rate (second derivative), in float64.

PARAMS = collections.OrderedDict(
    kernel=tff.TensorType(np.float64, [3, 4]),
    bias=tff.TensorType(np.float64, [4]),
    out=tff.TensorType(np.float64, [4]))
BATCH = collections.OrderedDict(
    x=tff.TensorType(np.float64, [5, 3]), y=tff.TensorType(np.float64, [5]))
CLIENT_LR = 0.1


def mlp_loss(params, batch):
  hidden = tf.tanh(batch['x'] @ params['kernel'] + params['bias'])
  return tf.reduce_mean(
      (tf.reduce_sum(hidden * params['out'], axis=-1) - batch['y']) ** 2)


def local_delta(w, batch):
  """Two local gradient steps; the model delta (initial - final)."""
  local = w
  for _ in range(2):
    with tf.GradientTape() as tape:
      tape.watch(local)
      loss = mlp_loss(local, batch)
    grads = tape.gradient(loss, local)
    local = tf.nest.map_structure(lambda p, g: p - CLIENT_LR * g, local, grads)
  return tf.nest.map_structure(tf.subtract, w, local)


def server_update(w, lr, delta):
  return tf.nest.map_structure(lambda p, d: p - lr * d, w, delta)


@tff_fad.federated_computation(
    tff.FederatedType(PARAMS, tff.SERVER),
    tff.FederatedType(np.float64, tff.SERVER),
    tff.FederatedType(BATCH, tff.CLIENTS))
def two_rounds_then_loss(w, lr, data):
  for _ in range(2):
    deltas = tff_fad.federated_map(local_delta,
                                   (tff_fad.federated_broadcast(w), data))
    w = tff_fad.federated_apply(server_update,
                                (w, lr, tff_fad.federated_mean(deltas)))
  return tff_fad.federated_mean(
      tff_fad.federated_map(mlp_loss, (tff_fad.federated_broadcast(w), data)))


def _central_loss(w, lr, data):
  w = tf.nest.map_structure(tf.convert_to_tensor, w)
  for _ in range(2):
    deltas = [local_delta(w, batch) for batch in data]
    w = server_update(w, lr, tf.nest.map_structure(
        lambda *d: tf.reduce_mean(tf.stack(d), axis=0), *deltas))
  return tf.reduce_mean([mlp_loss(w, batch) for batch in data])


def _values(seed=3, num_clients=3):
  rng = np.random.default_rng(seed)
  params = collections.OrderedDict(
      kernel=rng.normal(size=(3, 4)), bias=rng.normal(size=(4,)),
      out=rng.normal(size=(4,)))
  data = [collections.OrderedDict(x=rng.normal(size=(5, 3)),
                                  y=rng.normal(size=(5,)))
          for _ in range(num_clients)]
  direction = collections.OrderedDict(
      kernel=rng.normal(size=(3, 4)), bias=rng.normal(size=(4,)),
      out=rng.normal(size=(4,)))
  return params, data, direction


LR = 0.7


def _central_hvp(params, data, v):
  w = tf.nest.map_structure(tf.Variable, params)
  with tf.GradientTape() as outer:
    with tf.GradientTape() as inner:
      loss = _central_loss(w, tf.constant(LR, tf.float64), data)
    grads = inner.gradient(loss, w)
    gv = tf.add_n([tf.reduce_sum(g * d) for g, d in zip(
        tf.nest.flatten(grads), tf.nest.flatten(v))])
  return tf.nest.map_structure(lambda h: h.numpy(), outer.gradient(gv, w))


def _assert_tree_close(actual, expected, rtol):
  tf.nest.map_structure(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12),
      dict(actual), dict(expected))


# Forward over a forward-mode gradient pushes one direction per model element
# (20 here), each through two rounds of local training with a nested tape:
# right (checked on least squares above) but too slow for the suite.
_FEDAVG_HVPS = [p for p in _hvp_programs(two_rounds_then_loss, 'w')
                if p[0] != 'jvp(grad[forward])']


@pytest.mark.parametrize('name, hvp, call', _FEDAVG_HVPS,
                         ids=[n for n, _, _ in _FEDAVG_HVPS])
def test_fedavg_hvp_matches_central_double_tape_and_finite_differences(
    name, hvp, call):
  del name
  params, data, v = _values()
  actual = call(hvp, (params, LR, data), v)
  _assert_tree_close(actual, _central_hvp(params, data, v), rtol=1e-8)
  # Finite differences of the federated gradient along v.
  eps = 1e-5
  gradient = tff_fad.grad(two_rounds_then_loss, wrt='w')

  def at(sign):
    w = tf.nest.map_structure(lambda p, d: p + sign * eps * d, params, v)
    return gradient(w, LR, data)

  plus, minus = at(1.0), at(-1.0)
  finite_difference = tf.nest.map_structure(
      lambda a, b: (a - b) / (2 * eps), dict(plus), dict(minus))
  _assert_tree_close(actual, finite_difference, rtol=1e-5)


@pytest.mark.parametrize('inner', MODES)
@pytest.mark.parametrize('outer', MODES)
def test_second_derivative_in_the_server_learning_rate(inner, outer):
  params, data, _ = _values()
  hypergradient = tff_fad.grad(two_rounds_then_loss, wrt='lr', mode=inner)
  second = tff_fad.grad(hypergradient, wrt='lr', mode=outer)(params, LR, data)
  eps = 1e-5
  finite_difference = (hypergradient(params, LR + eps, data) -
                       hypergradient(params, LR - eps, data)) / (2 * eps)
  assert second == pytest.approx(finite_difference, rel=1e-6)
  lr = tf.Variable(LR, dtype=tf.float64)
  with tf.GradientTape() as outer_tape:
    with tf.GradientTape() as inner_tape:
      loss = _central_loss(params, lr, data)
    first = inner_tape.gradient(loss, lr)
  assert second == pytest.approx(outer_tape.gradient(first, lr).numpy(),
                                 rel=1e-9)


def test_a_derivative_program_is_a_tff_computation_usable_inside_tff():
  grad = tff_fad.grad(least_squares)
  assert isinstance(grad, tff.Computation)

  @tff.federated_computation(W_TYPE, tff.FederatedType(EXAMPLE, tff.CLIENTS))
  def gradient_step(w, data):
    g = grad(w, data)
    return tff.federated_map(
        tff.tensorflow.computation(lambda w, g: w - 0.01 * g,
                                   W_TYPE.member, W_TYPE.member),
        tff.federated_zip((w, g)))

  expected = W - 0.01 * np.mean(
      [(W @ d['x'] - d['y']) * d['x'] for d in DATA], axis=0)
  np.testing.assert_allclose(gradient_step(W, DATA), expected, rtol=RTOL)
