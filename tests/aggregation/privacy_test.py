"""Privacy reports: releases per mode and (epsilon, delta) via dp_accounting."""

import math

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad import aggregation

DPF = tff.aggregators.DifferentiallyPrivateFactory
W = tff.FederatedType(np.float32, tff.SERVER)
T = tff.TensorType(np.float32, [2])
D = tff.FederatedType(T, tff.CLIENTS)
Z, CLIENTS, Q, ROUNDS, DELTA = 1.1, 100, 0.01, 1000, 1e-5
# The DP query reports z as float32: epsilons agree to float32 precision.
RTOL = 1e-6

POINT = aggregation.AggregationPoint(
    DPF.gaussian_fixed(Z, CLIENTS, 1.0), T,
    tangent_factory=DPF.gaussian_fixed(Z, CLIENTS, 1.0),
    cotangent_factory=DPF.gaussian_fixed(Z, CLIENTS, 1.0),
    cotangent_type=np.float32)


@tff_fad.federated_computation(W, POINT.state_type, D)
def dp_program(w, state, d):
  products = tff_fad.federated_map(lambda w, d: w * d,
                                   (tff_fad.federated_broadcast(w), d))
  return aggregation.aggregate_with_factory(products, state, POINT).result


@tff_fad.federated_computation(W, D)
def plain_program(w, d):
  products = tff_fad.federated_map(lambda w, d: w * d,
                                   (tff_fad.federated_broadcast(w), d))
  return tff_fad.federated_sum(products)


def _direct_epsilon(event):
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(event, ROUNDS)
  return accountant.get_epsilon(DELTA)


def test_primal_epsilon_equals_dp_accounting_directly():
  report = aggregation.privacy_report(
      dp_program, sampling_rate=Q, rounds=ROUNDS, delta=DELTA)
  assert [(r.kind, r.mechanism) for r in report.releases] == [('value', 'dp')]
  direct = _direct_epsilon(dp_accounting.PoissonSampledDpEvent(
      Q, dp_accounting.GaussianDpEvent(Z)))
  assert report.epsilon == pytest.approx(direct, rel=RTOL)
  assert report.effective_noise_multiplier == pytest.approx(Z, rel=RTOL)


@pytest.mark.parametrize('mode, kind', [('forward', 'tangent'),
                                        ('reverse', 'cotangent'),
                                        ('reverse_recompute', 'cotangent')])
def test_derivative_releases_cost_more_than_the_primal(mode, kind):
  primal = aggregation.privacy_report(
      dp_program, sampling_rate=Q, rounds=ROUNDS, delta=DELTA)
  derivative = aggregation.privacy_report(
      dp_program, sampling_rate=Q, rounds=ROUNDS, delta=DELTA, mode=mode)
  assert sorted((r.kind, r.mechanism) for r in derivative.releases) == sorted([
      ('value', 'dp'), (kind, 'dp')])
  # Two Gaussian releases with z on one sample: one Gaussian, z / sqrt(2).
  direct = _direct_epsilon(dp_accounting.PoissonSampledDpEvent(
      Q, dp_accounting.GaussianDpEvent(Z / math.sqrt(2))))
  assert derivative.epsilon == pytest.approx(direct, rel=RTOL)
  assert derivative.epsilon > primal.epsilon


def test_plain_release_makes_epsilon_infinite():
  report = aggregation.privacy_report(
      plain_program, sampling_rate=1.0, rounds=1, delta=DELTA,
      mode='reverse')
  assert sorted((r.kind, r.mechanism) for r in report.releases) == [
      ('cotangent', 'plain'), ('value', 'plain')]
  assert math.isinf(report.epsilon)
  assert 'without DP' in str(report)


def test_secure_sum_releases_are_named():
  @tff_fad.federated_computation(W, D)
  def secure(w, d):
    products = tff_fad.federated_map(lambda w, d: w * d,
                                     (tff_fad.federated_broadcast(w), d))
    return aggregation.federated_secure_sum(
        products, clip_range=(-1, 1), num_clients_bound=10,
        cotangent_clip_range=(-1, 1))

  found = aggregation.releases(secure, mode='reverse')
  assert sorted((r.kind, r.mechanism) for r in found) == [
      ('cotangent', 'secure_sum'), ('value', 'secure_sum')]


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match='sampling_rate'):
    aggregation.privacy_report(dp_program, sampling_rate=0.0, rounds=1,
                               delta=DELTA)
  with pytest.raises(ValueError, match='mode'):
    aggregation.releases(dp_program, mode='backward')


def test_tree_aggregation_needs_its_own_accounting():
  point = aggregation.AggregationPoint(
      DPF.tree_aggregation(Z, CLIENTS, 1.0, tf.TensorSpec([2], tf.float32)), T)

  @tff_fad.federated_computation(W, point.state_type, D)
  def tree(w, state, d):
    del w
    return aggregation.aggregate_with_factory(d, state, point).result

  with pytest.raises(ValueError, match='tree_aggregation_accountant'):
    aggregation.privacy_report(tree, sampling_rate=Q, rounds=ROUNDS,
                               delta=DELTA)


@tff_fad.federated_computation(W, POINT.state_type, D)
def dp_program_with_plain_aux(w, state, d):
  products = tff_fad.federated_map(lambda w, d: w * d,
                                   (tff_fad.federated_broadcast(w), d))
  result = aggregation.aggregate_with_factory(products, state, POINT).result
  # Depends on w too, but only as auxiliary output: jvp(has_aux=True) sums
  # its values and never its tangent.
  return result, tff_fad.federated_sum(products)


def test_forward_mode_with_aux_releases_only_the_tangents_jvp_computes():
  found = aggregation.releases(dp_program_with_plain_aux, mode='forward',
                               has_aux=True)
  assert [(r.kind, r.mechanism) for r in found] == [
      ('value', 'dp'), ('tangent', 'dp'), ('value', 'plain')]
  # Both outputs differentiated: the plain sum's tangent is released too.
  found = aggregation.releases(dp_program_with_plain_aux, mode='forward')
  assert [(r.kind, r.mechanism) for r in found] == [
      ('value', 'dp'), ('tangent', 'dp'), ('value', 'plain'),
      ('tangent', 'plain')]
  # The jvp program agrees: the aux sum is returned without a tangent.
  jvp = tff_fad.jvp(dp_program_with_plain_aux, has_aux=True)
  assert [str(t) for t in jvp.type_signature.result] == [
      'float32[2]@SERVER'] * 3  # (value, tangent, aux)
  _, _, aux = jvp(
      np.float32(2.0), POINT.initialize(),
      [np.array([1., 2.], np.float32), np.array([3., -1.], np.float32)],
      np.float32(1.0))
  np.testing.assert_array_equal(aux, [8., 2.])


def test_an_aux_path_jvp_builds_has_a_report_too():
  @tff_fad.federated_computation(W, D)
  def sum_and_largest(w, d):
    products = tff_fad.federated_map(lambda w, d: w * d,
                                     (tff_fad.federated_broadcast(w), d))
    # federated_max has no derivative rule; jvp(has_aux=True) runs it as a
    # primal.
    return tff_fad.federated_sum(products), tff_fad.federated_max(products)

  value, tangent, largest = tff_fad.jvp(sum_and_largest, has_aux=True)(
      np.float32(2.0),
      [np.array([1., 2.], np.float32), np.array([3., -1.], np.float32)],
      np.float32(0.5))
  np.testing.assert_array_equal(value, [8., 2.])
  np.testing.assert_array_equal(tangent, [2., 0.5])
  np.testing.assert_array_equal(largest, [6., 4.])
  found = aggregation.releases(sum_and_largest, mode='forward', has_aux=True)
  assert [(r.kind, r.mechanism) for r in found] == [
      ('value', 'plain'), ('tangent', 'plain'), ('value', 'plain')]
  # Without has_aux the report refuses what jvp refuses, with its error.
  with pytest.raises(tff_fad.NotDifferentiableError, match='federated_max'):
    tff_fad.jvp(sum_and_largest)
  with pytest.raises(tff_fad.NotDifferentiableError, match='federated_max'):
    aggregation.releases(sum_and_largest, mode='forward')
