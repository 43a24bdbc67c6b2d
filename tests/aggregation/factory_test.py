"""aggregate_with_factory: tff.aggregators (DP, ...) as aggregation points."""

import numpy as np
import tensorflow as tf
import pytest
import tensorflow_federated as tff

import tff_fad
from tff_fad import aggregation

DPF = tff.aggregators.DifferentiallyPrivateFactory
W = tff.FederatedType(np.float32, tff.SERVER)
T = tff.TensorType(np.float32, [2])
D = tff.FederatedType(T, tff.CLIENTS)
DATA = [np.array([1.0, 2.0], np.float32), np.array([3.0, -4.0], np.float32),
        np.array([30.0, 1.0], np.float32)]
W0 = 2.0
N = len(DATA)
# gaussian_fixed divides by clients_per_round (N): a mean of w * d_i.
EXACT = W0 * np.sum(DATA, axis=0) / N
EXACT_TANGENT = np.sum(DATA, axis=0) / N


def exact_dp(clients=N):
  # Zero noise and a clip far above every norm: DP is the exact mean.
  return DPF.gaussian_fixed(0.0, clients, 1e4)


POINT = aggregation.AggregationPoint(
    exact_dp(), T, tangent_factory=exact_dp(), cotangent_factory=exact_dp(),
    cotangent_type=np.float32, name='update')


def _program(point):
  @tff_fad.federated_computation(W, point.state_type, D)
  def weighted(w, state, d):
    products = tff_fad.federated_map(lambda w, d: w * d,
                                     (tff_fad.federated_broadcast(w), d))
    out = aggregation.aggregate_with_factory(products, state, point)
    return out.result, out.state

  return weighted


PROGRAM = _program(POINT)


def test_zero_noise_primal_is_exact_and_state_is_threaded():
  state = POINT.initialize()
  result, new_state = PROGRAM(W0, state, DATA)
  np.testing.assert_allclose(result, EXACT, rtol=1e-6)
  assert state['value'].is_init_state
  assert not new_state['value'].is_init_state
  assert new_state['tangent'].is_init_state  # The primal runs no tangent.


def test_zero_noise_forward_is_exact_and_threads_tangent_state():
  jvp = tff_fad.jvp(PROGRAM, has_aux=True)
  result, tangent, new_state = jvp(W0, POINT.initialize(), DATA, 1.0)
  np.testing.assert_allclose(result, EXACT, rtol=1e-6)
  np.testing.assert_allclose(tangent, EXACT_TANGENT, rtol=1e-6)
  assert not new_state['tangent'].is_init_state


@pytest.mark.parametrize('mode', ['reverse', 'reverse_recompute'])
def test_zero_noise_reverse_is_exact(mode):
  vjp = tff_fad.vjp(PROGRAM, mode=mode, has_aux=True)
  ct, _ = vjp(W0, POINT.initialize(), DATA, np.ones(2, np.float32))
  np.testing.assert_allclose(ct, EXACT_TANGENT.sum(), rtol=1e-6)


def test_noise_std_matches_configuration():
  # One call, 4000 noisy coordinates per release: std estimates within ~3%.
  size, clip, clients = 4000, 1.0, 2
  z_value, z_tangent = 0.5, 2.0
  vector = tff.TensorType(np.float32, [size])
  point = aggregation.AggregationPoint(
      DPF.gaussian_fixed(z_value, clients, clip), vector,
      tangent_factory=DPF.gaussian_fixed(z_tangent, clients, clip))

  @tff_fad.federated_computation(W, point.state_type)
  def noisy(w, state):
    zeros = tff_fad.federated_map(
        lambda v: v * np.zeros(size, np.float32),
        tff_fad.federated_broadcast(w))
    return aggregation.aggregate_with_factory(zeros, state, point).result

  value, tangent = tff_fad.jvp(noisy)(1.0, point.initialize(), 1.0)
  # GaussianSumQuery adds N(0, (z clip)^2); the DP mean divides by clients.
  np.testing.assert_allclose(np.std(value), z_value * clip / clients,
                             rtol=0.08)
  np.testing.assert_allclose(np.std(tangent), z_tangent * clip / clients,
                             rtol=0.08)
  assert abs(np.mean(value)) < 4 * z_value * clip / clients / np.sqrt(size)


def test_missing_derivative_factories_are_refused():
  point = aggregation.AggregationPoint(exact_dp(), T)
  program = _program(point)
  with pytest.raises(tff_fad.NotDifferentiableError,
                     match='tangent_factory'):
    tff_fad.jvp(program, has_aux=True)
  with pytest.raises(tff_fad.NotDifferentiableError,
                     match='cotangent_factory'):
    tff_fad.vjp(program, has_aux=True)


def test_evolving_cotangent_state_is_refused():
  with pytest.raises(ValueError, match='evolving state'):
    aggregation.AggregationPoint(
        exact_dp(), T, cotangent_factory=DPF.gaussian_adaptive(0.01, N))


def test_wrong_state_type_is_refused():
  other = aggregation.AggregationPoint(tff.aggregators.SumFactory(), T)
  with pytest.raises(tff_fad.FederatedADError, match='state must have type'):
    @tff_fad.federated_computation(W, other.state_type, D)
    def _(w, state, d):
      del w
      return aggregation.aggregate_with_factory(d, state, POINT).result


def _sum_mean_factories():
  clip = 1e4  # Far above every norm: no clipping.
  return {
      'gaussian_adaptive': (DPF.gaussian_adaptive(
          0.0, N, initial_l2_norm_clip=clip), N),
      'tree_aggregation': (DPF.tree_aggregation(
          0.0, N, clip, tf.TensorSpec([2], tf.float32)), N),
      'secure_sum': (tff.aggregators.SecureSumFactory(100.0, -100.0), 1),
      'clipping': (tff.aggregators.clipping_factory(
          clip, tff.aggregators.SumFactory()), 1),
  }


@pytest.mark.parametrize('name', sorted(_sum_mean_factories()))
def test_other_factories_primal_and_forward(name):
  factory, divisor = _sum_mean_factories()[name]
  point = aggregation.AggregationPoint(
      factory, T, tangent_factory=tff.aggregators.SumFactory(), name=name)
  program = _program(point)
  # Secure sums only run in TFF's test context; the others run there too.
  with aggregation.secure_simulation_context():
    state = point.initialize()
    result, state = program(W0, state, DATA)
    # The state threads into a second round.
    again, _ = program(W0, state, DATA)
    _, tangent, _ = tff_fad.jvp(program, has_aux=True)(W0, state, DATA, 1.0)
  exact_sum = W0 * np.sum(DATA, axis=0)
  np.testing.assert_allclose(result, exact_sum / divisor, rtol=1e-5)
  np.testing.assert_allclose(again, exact_sum / divisor, rtol=1e-5)
  np.testing.assert_allclose(tangent, np.sum(DATA, axis=0), rtol=1e-5)


def test_reverse_cotangent_noise_matches_configuration():
  size, clip, clients, z = 4000, 1.0, 2, 0.5
  vector = tff.TensorType(np.float32, [size])
  point = aggregation.AggregationPoint(
      DPF.gaussian_fixed(0.0, clients, clip), vector,
      cotangent_factory=DPF.gaussian_fixed(z, clients, clip),
      cotangent_type=vector)

  @tff_fad.federated_computation(
      tff.FederatedType(vector, tff.SERVER), point.state_type)
  def zeroed(w, state):
    zeros = tff_fad.federated_map(lambda v: v * 0.0,
                                  tff_fad.federated_broadcast(w))
    return aggregation.aggregate_with_factory(zeros, state, point).result

  ct = tff_fad.vjp(zeroed)(np.ones(size, np.float32), point.initialize(),
                           np.ones(size, np.float32))
  # The exact cotangent is 0; the DP sum adds N(0, (z clip)^2) (the DP
  # query's division by clients_per_round is undone to release a sum).
  np.testing.assert_allclose(np.std(ct), z * clip, rtol=0.08)


@pytest.mark.parametrize('k', [1, 4])
def test_seeded_tangents_through_a_factory_point_equal_the_plain_sum(k):
  seed = np.array([7, 11], np.int64)
  point = aggregation.AggregationPoint(
      exact_dp(), T, tangent_factory=exact_dp(), name='update',
      num_directions=k)
  value, tangent, _ = tff_fad.jvp(
      _program(point), wrt='w', num_directions=k, tangent_seed=True,
      has_aux=True)(
          W0, point.initialize(), DATA, seed)

  @tff_fad.federated_computation(W, D)
  def plain(w, d):
    products = tff_fad.federated_map(lambda w, d: w * d,
                                     (tff_fad.federated_broadcast(w), d))
    return tff_fad.federated_mean(products)

  plain_value, plain_tangent = tff_fad.jvp(
      plain, wrt='w', num_directions=k, tangent_seed=True)(W0, DATA, seed)
  np.testing.assert_allclose(value, plain_value, rtol=1e-6)
  np.testing.assert_allclose(tangent, plain_tangent, rtol=1e-5, atol=1e-6)
  directions = tff_fad.seeded_tangents(tf.constant(seed), [np.float32(W0)], k)[0]
  np.testing.assert_allclose(
      tangent, np.multiply.outer(directions, EXACT_TANGENT), rtol=1e-5)
