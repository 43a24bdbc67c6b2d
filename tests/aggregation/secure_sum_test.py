"""federated_secure_sum: values and derivatives within the stated bound."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad import aggregation
from tff_fad.aggregation import secure_sum
from tff_fad.core import cost

W = tff.FederatedType(np.float32, tff.SERVER)
D = tff.FederatedType(tff.TensorType(np.float32, [2]), tff.CLIENTS)
RANGE, T_RANGE, CT_RANGE, BITS, BOUND = (-10.0, 10.0), (-8.0, 8.0), (
    -20.0, 20.0), 16, 10
# Client 3's first product, 2 * 30 = 60, is outside RANGE: clipped to 10.
DATA = [np.array([1.0, 2.0], np.float32), np.array([3.0, -4.0], np.float32),
        np.array([30.0, 1.0], np.float32)]
W0 = 2.0
EXACT = np.array([2 + 6 + 10, 4 - 8 + 2], np.float32)
# d/dw sum_i clip(w d_i): clipped elements contribute 0.
EXACT_TANGENT = np.array([1 + 3 + 0, 2 - 4 + 1], np.float32)


def _bound(clip_range):
  q = secure_sum.make_quantizer('r', clip_range, BITS, BOUND)
  return q.error_bound(len(DATA)) + 1e-5 * 20  # + float32 rounding.


@tff_fad.federated_computation(W, D)
def scaled_sum(w, d):
  products = tff_fad.federated_map(lambda w, d: w * d,
                                   (tff_fad.federated_broadcast(w), d))
  return aggregation.federated_secure_sum(
      products, clip_range=RANGE, num_clients_bound=BOUND, bitwidth=BITS,
      tangent_clip_range=T_RANGE, cotangent_clip_range=CT_RANGE,
      return_clipped_count=True)


@tff_fad.federated_computation(W, D)
def no_derivative_ranges(w, d):
  products = tff_fad.federated_map(lambda w, d: w * d,
                                   (tff_fad.federated_broadcast(w), d))
  return aggregation.federated_secure_sum(products, clip_range=RANGE,
                                          num_clients_bound=BOUND)


@pytest.fixture(scope='module', autouse=True)
def _simulation():
  with aggregation.secure_simulation_context():
    yield


def test_primal_clips_counts_and_is_within_bound():
  total, clipped = scaled_sum(W0, DATA)
  np.testing.assert_allclose(total, EXACT, atol=_bound(RANGE))
  assert clipped == 1


def test_forward_derivative_within_bound_and_secure():
  jvp = tff_fad.jvp(scaled_sum, has_aux=False)
  (total, clipped), (tangent, _) = jvp(W0, DATA, 1.0)
  np.testing.assert_allclose(total, EXACT, atol=_bound(RANGE))
  np.testing.assert_allclose(tangent, EXACT_TANGENT, atol=_bound(T_RANGE))
  assert clipped == 1  # No tangent was outside T_RANGE.
  used = cost.intrinsics_used(jvp)
  # Value and tangent travel in ONE secure sum; nothing is summed in clear.
  assert used.get('federated_secure_sum_bitwidth') == 1
  assert not {'federated_sum', 'federated_mean',
              'federated_weighted_mean'} & set(used)


@pytest.mark.parametrize('mode', ['reverse', 'reverse_recompute'])
def test_reverse_derivative_within_bound_and_secure(mode):
  vjp = tff_fad.vjp(scaled_sum, mode=mode)
  ct = vjp(W0, DATA, (np.ones(2, np.float32), 0.0))
  np.testing.assert_allclose(ct, EXACT_TANGENT.sum(), atol=_bound(CT_RANGE))
  used = cost.intrinsics_used(vjp)
  # The broadcast's cotangent sum is secure. The forward sweep's sum is not
  # an output of vjp and the backward sweep reads only its type (the
  # transpose of selecting the total from <total, clipped count>), so the
  # program does not run it.
  assert used.get('federated_secure_sum_bitwidth') == 1
  assert not {'federated_sum', 'federated_mean',
              'federated_weighted_mean'} & set(used)


def test_bound_holds_for_random_values():
  rng = np.random.default_rng(0)
  data = [rng.uniform(-4, 4, size=2).astype(np.float32) for _ in range(3)]
  total, clipped = scaled_sum(W0, data)
  np.testing.assert_allclose(total, 2 * np.sum(data, axis=0),
                             atol=_bound(RANGE))
  assert clipped == 0


def test_derivative_without_ranges_is_refused():
  with pytest.raises(tff_fad.NotDifferentiableError,
                     match='tangent_clip_range'):
    tff_fad.jvp(no_derivative_ranges)
  with pytest.raises(tff_fad.NotDifferentiableError,
                     match='cotangent_clip_range'):
    tff_fad.grad(tff_fad.federated_computation(W, D)(
        lambda w, d: tff_fad.federated_apply(
            lambda s: s[0], no_derivative_ranges(w, d))))


def test_overflowing_configuration_is_refused():
  with pytest.raises(ValueError, match='overflow'):
    secure_sum.make_quantizer('clip_range', RANGE, 40, 2**30)
  q = secure_sum.make_quantizer('clip_range', RANGE, None, 2**30)
  assert q.sum_bitwidth <= secure_sum.MAX_SUM_BITWIDTH
  with pytest.raises(ValueError, match='lower < upper'):
    secure_sum.make_quantizer('clip_range', (1.0, -1.0), 8, 3)


def test_more_clients_than_bound_fails_at_run_time():
  @tff_fad.federated_computation(D)
  def small_bound(d):
    return aggregation.federated_secure_sum(d, clip_range=RANGE,
                                            num_clients_bound=2)

  with pytest.raises(Exception, match='num_clients_bound'):
    small_bound(DATA)


def test_out_of_range_tangents_are_clipped_and_counted():
  (_, clipped), (tangent, _) = tff_fad.jvp(scaled_sum)(W0, DATA, 10.0)
  # Tangents 10 * d, 0 where the value was clipped: [10, 20], [30, -40],
  # [0, 10]. Five lie outside T_RANGE = (-8, 8) and are clipped to +-8.
  np.testing.assert_allclose(tangent, [8 + 8 + 0, 8 - 8 + 8],
                             atol=_bound(T_RANGE))
  assert clipped == 1 + 5  # The value's one clipped element, and five.


def test_broadcast_feeding_two_secure_sums_uses_the_widest_range():
  @tff_fad.federated_computation(W, D)
  def two_sums(w, d):
    products = tff_fad.federated_map(lambda w, d: w * d,
                                     (tff_fad.federated_broadcast(w), d))
    first = aggregation.federated_secure_sum(
        products, clip_range=RANGE, num_clients_bound=BOUND, bitwidth=BITS,
        cotangent_clip_range=(-1.0, 1.0))
    second = aggregation.federated_secure_sum(
        products, clip_range=RANGE, num_clients_bound=BOUND, bitwidth=BITS,
        cotangent_clip_range=CT_RANGE)
    return tff_fad.federated_apply(lambda a, b: tf.reduce_sum(a + b),
                                   (first, second))

  # d/dw of both sums: twice EXACT_TANGENT's total. The clients' cotangents
  # (6, -2, 2) fit the union CT_RANGE but not (-1, 1): had the narrower
  # range been used, they would be clipped and the gradient wrong.
  grad = tff_fad.grad(two_sums)(W0, DATA)
  np.testing.assert_allclose(grad, 2 * EXACT_TANGENT.sum(),
                             atol=2 * _bound(CT_RANGE))


def test_broadcast_feeding_secure_sum_and_dp_point_is_refused_in_reverse():
  point = aggregation.AggregationPoint(
      tff.aggregators.SumFactory(), tff.TensorType(np.float32, [2]),
      cotangent_factory=tff.aggregators.SumFactory(),
      cotangent_type=np.float32)

  @tff_fad.federated_computation(W, point.state_type, D)
  def mixed(w, state, d):
    products = tff_fad.federated_map(lambda w, d: w * d,
                                     (tff_fad.federated_broadcast(w), d))
    first = aggregation.federated_secure_sum(
        products, clip_range=RANGE, num_clients_bound=BOUND,
        cotangent_clip_range=CT_RANGE)
    second = aggregation.aggregate_with_factory(products, state, point).result
    return tff_fad.federated_apply(lambda a, b: tf.reduce_sum(a + b),
                                   (first, second))

  with pytest.raises(tff_fad.NotDifferentiableError,
                     match='cannot be combined'):
    tff_fad.grad(mixed)


# Seeded tangents (jvp(tangent_seed=True)) through a secure sum: the same
# numbers as through federated_sum, within the tangent's quantization bound.
# Values and tangents stay inside their ranges (no clipping): |w d| <= 8,
# |direction * d| <= 2.5 * 2 for these seeded directions.
SMALL_DATA = [np.array([1.0, 2.0], np.float32),
              np.array([-1.5, 0.5], np.float32),
              np.array([0.25, -2.0], np.float32)]
SEED = np.array([7, 11], np.int64)


def _scaled(aggregate):
  @tff_fad.federated_computation(W, D)
  def program(w, d):
    products = tff_fad.federated_map(lambda w, d: w * d,
                                     (tff_fad.federated_broadcast(w), d))
    return aggregate(products)

  return program


@pytest.mark.parametrize('k', [1, 4])
def test_seeded_tangents_through_a_secure_sum_equal_the_plain_sums(k):
  # Failed with "TypeError: Expected a Python types that is convertible to a
  # tff.Value, found <class 'NoneType'>": the secure sum packs value and
  # tangent into one message, and a seeded dual had no packed form.
  secure = _scaled(lambda x: aggregation.federated_secure_sum(
      x, clip_range=RANGE, num_clients_bound=BOUND, bitwidth=BITS,
      tangent_clip_range=T_RANGE))
  plain = _scaled(tff_fad.federated_sum)
  value, tangent = tff_fad.jvp(secure, num_directions=k, tangent_seed=True)(
      W0, SMALL_DATA, SEED)
  plain_value, plain_tangent = tff_fad.jvp(
      plain, num_directions=k, tangent_seed=True)(W0, SMALL_DATA, SEED)
  directions = tff_fad.seeded_tangents(tf.constant(SEED), [np.float32(W0)], k)[0]
  assert np.all(np.abs(np.multiply.outer(directions, SMALL_DATA)) < 6)
  np.testing.assert_allclose(value, plain_value, atol=_bound(RANGE))
  np.testing.assert_allclose(tangent, plain_tangent, atol=_bound(T_RANGE))
  np.testing.assert_allclose(
      plain_tangent, np.multiply.outer(directions, np.sum(SMALL_DATA, 0)),
      rtol=1e-5)
  used = cost.intrinsics_used(tff_fad.jvp(secure, num_directions=k,
                                          tangent_seed=True))
  assert used.get('federated_secure_sum_bitwidth') == 1
  assert not {'federated_sum', 'federated_mean'} & set(used)
