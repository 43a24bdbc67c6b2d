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
