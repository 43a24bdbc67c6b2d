"""Tests of tff_fad.workers: rounds split over TFF worker services."""

import datetime
import os
import re
import signal
import socket
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_fad import data as fad_data
from tff_fad import local_workers
from tff_fad import served_workers
from tff_fad import worker_tls
from tff_fad import workers
from tff_fad.learning import baffle
from tff_fad.learning import hypergradient_fed_avg
from tff_fad.learning import models

# ---------------------------------------------------------------------------
# Connecting.


def test_unreachable_worker_is_named_after_the_timeout():
  start = time.monotonic()
  with pytest.raises(workers.WorkerUnavailableError,
                     match=r'127\.0\.0\.1:1: not reachable within 1 s') as e:
    workers.create_worker_context('127.0.0.1:1', connect_timeout_seconds=1)
  assert e.value.address == '127.0.0.1:1'
  assert time.monotonic() - start < 30


# ---------------------------------------------------------------------------
# One process vs two workers.


@pytest.fixture(scope='module')
def two_workers():
  with local_workers.LocalWorkers(2) as local:
    yield local
  for pid in local.pids:
    assert not local_workers.is_running(pid), pid



@pytest.fixture(scope='module')
def digits_setup():
  fed = fad_data.load_federated_digits(num_clients=12, dirichlet_alpha=0.5,
                                       seed=1, pad_to_32x32=False)
  net = models.get_net('linear', fed.image_shape)
  model = models.to_functional_model(net, fed.image_shape, seed=1)
  ids = fed.train.client_ids

  def round_data(round_num, num_clients=5):
    rng = np.random.default_rng([1, round_num])
    chosen = rng.choice(len(ids), num_clients, replace=False)
    return [fed.train.create_tf_dataset_for_client(ids[i]).batch(16)
            for i in chosen]

  return model, round_data


def _train(process, round_data, rounds):
  state = process.initialize()
  metrics = []
  for round_num in range(1, rounds + 1):
    output = process.next(state, round_data(round_num))
    state = output.state
    metrics.append(output.metrics)
  return state, metrics


def _assert_states_close(a, b, atol):
  flat_a, flat_b = tf.nest.flatten(a), tf.nest.flatten(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=0, atol=atol)


def _builders():
  sgd = tff.learning.optimizers.build_sgdm(0.05)
  return {
      'hypergradient_forward': lambda m: (
          hypergradient_fed_avg.build_hypergradient_fed_avg(
              m, sgd, tff.learning.optimizers.build_sgdm(0.3))),
      # Two stages: the round's aggregations, then the backward sweep's.
      'hypergradient_reverse': lambda m: (
          hypergradient_fed_avg.build_hypergradient_fed_avg(
              m, sgd, tff.learning.optimizers.build_sgdm(0.3),
              mode='reverse')),
      'learned_weighting': lambda m: (
          hypergradient_fed_avg.build_learned_weighting_fed_avg(
              m, sgd, tff.learning.optimizers.build_sgdm(0.3))),
      'baffle_forward': lambda m: baffle.build_baffle(
          m, num_perturbations=16, seed=3),
      'tff_weighted_fed_avg': lambda m: (
          tff.learning.algorithms.build_weighted_fed_avg(
              m, client_optimizer_fn=sgd)),
  }


# Splitting the clients changes only the order of float32 additions in the
# aggregation (a sum per worker, then the merge). Adam divides by sqrt(v) and
# so magnifies such differences where the gradient is near zero: BAFFLE's
# Adam per coordinate (1e-4, far below one step of lr 1e-2), and the
# hyper-optimizer's, which has no momentum to average them out, in the
# learned rate and exponent (1e-5 against steps of about 0.1). Both still
# catch a wrong merge.
_TOLERANCE = {'hypergradient_forward': 1e-5, 'hypergradient_reverse': 1e-5,
              'learned_weighting': 1e-5,
              'baffle_forward': 1e-4, 'tff_weighted_fed_avg': 1e-6}


_BUILDERS = _builders()


@pytest.mark.parametrize('name', sorted(_BUILDERS))
def test_two_workers_give_the_one_process_result(name, two_workers,
                                                 digits_setup):
  model, round_data = digits_setup
  process = _BUILDERS[name](model)
  local_state, local_metrics = _train(process, round_data, rounds=3)
  with workers.worker_context(two_workers.addresses):
    worker_state, worker_metrics = _train(process, round_data, rounds=3)
  _assert_states_close(local_state, worker_state, _TOLERANCE[name])
  _assert_states_close(local_metrics, worker_metrics, _TOLERANCE[name])
  # The learning actually moved the model: the comparison is not vacuous.
  initial = tf.nest.flatten(process.get_model_weights(process.initialize()))
  final = tf.nest.flatten(process.get_model_weights(worker_state))
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(initial, final)) > 1e-3


def _arrive_and_wait_for_the_other_client(directory):
  """A client computation: mark arrival in `directory`, wait for both marks.

  Each client returns 1 if it saw the other client's mark while it was still
  running, 0 if 60 s passed first. A runtime that computes the parts one after
  the other can never return [1, 1]; one that computes them at the same time
  does so however loaded the machine is.
  """

  @tff.tensorflow.computation(np.int32)
  def arrive_and_wait(index):
    arrived = tf.io.write_file(
        tf.strings.join([directory, '/arrived_', tf.strings.as_string(index)]),
        '')
    with tf.control_dependencies([arrived]):
      start = tf.timestamp()

    def still_waiting(now, seen):
      return tf.logical_and(seen < 2, now - start < 60.0)

    def look_again(now, unused_seen):
      # The empty suffix depends on the loop variable so that no graph
      # optimization can evaluate the pattern's matches only once.
      pattern = tf.strings.join(
          [directory, '/arrived_*',
           tf.strings.substr(tf.strings.as_string(now), 0, 0)])
      return tf.timestamp(), tf.size(tf.io.matching_files(pattern))

    _, seen = tf.while_loop(still_waiting, look_again, [start, 0])
    # tf.equal: in TFF's graph context `==` compares tensors by identity.
    return tf.cast(tf.equal(seen, 2), tf.int32)

  @tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
  def both_arrive(indices):
    return tff.federated_map(arrive_and_wait, indices)

  return both_arrive


def test_workers_compute_their_parts_at_the_same_time(two_workers, tmp_path):
  # TFF's remote executor blocks its event loop on each gRPC call; without a
  # loop per worker, the second part would start after the first ended, and
  # the first client would give up waiting for the second.
  both_arrive = _arrive_and_wait_for_the_other_client(str(tmp_path))
  with workers.worker_context(two_workers.addresses):
    saw_the_other = both_arrive([0, 1])
  np.testing.assert_array_equal(saw_the_other, [1, 1])
  assert sorted(os.listdir(tmp_path)) == ['arrived_0', 'arrived_1']


@tff.tensorflow.computation(np.int32)
def _index_a_second_late_for_client_0(index):
  start = tf.timestamp()
  wait = tf.where(tf.equal(index, 0), tf.constant(1.0, tf.float64), 0.0)
  end = tf.while_loop(lambda t: t - start < wait, lambda t: tf.timestamp(),
                      [start])[0]
  with tf.control_dependencies([end]):
    return tf.identity(index)


@tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
def _total_and_indices(indices):
  values = tff.federated_map(_index_a_second_late_for_client_0, indices)
  return tff.federated_sum(values), values


def test_client_placed_results_keep_the_clients_order(two_workers):
  # The second worker's part finishes first; TFF 0.87's mergeable context
  # concatenated the parts in the order they finished.
  with workers.worker_context(two_workers.addresses):
    total, values = _total_and_indices([0, 1, 2, 3])
  assert total == 6
  assert list(values) == [0, 1, 2, 3]


def test_a_worker_killed_in_the_second_stage_is_named_and_the_round_reruns(
    digits_setup):
  model, round_data = digits_setup
  process = hypergradient_fed_avg.build_hypergradient_fed_avg(
      model, mode='reverse')
  state = process.next(process.initialize(), round_data(1)).state
  expected = process.next(state, round_data(2))
  with local_workers.LocalWorkers(2) as local:
    context = workers.create_worker_context(local.addresses)
    stages_run = []
    run_stage = context._invoke_stage  # pylint: disable=protected-access

    def kill_before_the_second_stage(comp, arg):
      stages_run.append(comp)
      if len(stages_run) == 2:
        os.kill(local.pids[1], signal.SIGKILL)
      return run_stage(comp, arg)

    context._invoke_stage = kill_before_the_second_stage  # pylint: disable=protected-access
    with tff.framework.get_context_stack().install(context):
      with pytest.raises(workers.WorkerUnavailableError,
                         match='stopped responding') as e:
        process.next(state, round_data(2))
  assert e.value.address == local.addresses[1]
  assert len(stages_run) == 2
  # The state the round started from is intact: with the workers back, the
  # round runs again from it and gives the one-process result.
  with local_workers.LocalWorkers(2) as local:
    with workers.worker_context(local.addresses):
      rerun = process.next(state, round_data(2))
  _assert_states_close(rerun, expected, _TOLERANCE['hypergradient_reverse'])


def test_a_dead_worker_is_named_instead_of_hanging(digits_setup):
  model, round_data = digits_setup
  process = baffle.build_baffle(model, num_perturbations=4)
  with local_workers.LocalWorkers(2) as local:
    with workers.worker_context(local.addresses):
      state = process.next(process.initialize(), round_data(1)).state
      os.kill(local.pids[1], signal.SIGKILL)
      start = time.monotonic()
      with pytest.raises(workers.WorkerUnavailableError,
                         match='stopped responding') as e:
        process.next(state, round_data(2))
  assert e.value.address == local.addresses[1]
  assert time.monotonic() - start < 60




# ---------------------------------------------------------------------------
# Workers behind TLS fronts (`python -m tff_fad.local_workers serve`).


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
  """The cluster's CA, another CA, and certificates past their end date."""
  root = tmp_path_factory.mktemp('pki')
  cluster = worker_tls.make_certificates(str(root / 'cluster'), ['127.0.0.1'])
  other = worker_tls.make_certificates(str(root / 'other'), ['127.0.0.1'],
                                       ca_name='another CA')
  ten_days_ago = (datetime.datetime.now(datetime.timezone.utc)
                  - datetime.timedelta(days=10))
  expired = worker_tls.make_certificates(
      str(root / 'expired'), ['127.0.0.1'], days=1, not_before=ten_days_ago,
      ca=cluster['ca'])
  return {'cluster': cluster, 'other': other, 'expired': expired}


def _tls(pki, ca='cluster', client='cluster'):
  client = pki[client] if client else None
  return workers.WorkerTls(pki[ca]['ca_cert'],
                           client['driver_cert'] if client else None,
                           client['driver_key'] if client else None)


@pytest.fixture(scope='module')
def two_tls_workers(pki):
  cluster = pki['cluster']
  with served_workers.ServedWorkers(
      2, tls_ca=cluster['ca_cert'], tls_cert=cluster['worker_cert'],
      tls_key=cluster['worker_key']) as served:
    yield served
  for pid in served.pids + served.worker_pids:
    assert not local_workers.is_running(pid), pid


def test_two_tls_workers_give_the_one_process_result(two_tls_workers, pki,
                                                     digits_setup):
  model, round_data = digits_setup
  process = _BUILDERS['hypergradient_forward'](model)
  local_state, local_metrics = _train(process, round_data, rounds=2)
  with workers.worker_context(two_tls_workers.addresses, tls=_tls(pki)):
    tls_state, tls_metrics = _train(process, round_data, rounds=2)
  tolerance = _TOLERANCE['hypergradient_forward']
  _assert_states_close(local_state, tls_state, tolerance)
  _assert_states_close(local_metrics, tls_metrics, tolerance)
  with open(os.path.join(two_tls_workers.log_dir, 'serve_0.log')) as f:
    assert 'accepted, client certificate commonName=tff_fad driver' in f.read()


@pytest.mark.parametrize('ca, client, reason', [
    ('cluster', None, 'this driver presented no client certificate'),
    ('cluster', 'other', "this driver's certificate is not signed by the "
     "worker's CA"),
    ('cluster', 'expired', "this driver's certificate has expired"),
    # The driver's side: the worker's certificate is of a CA it does not
    # trust.
    ('other', 'other', 'its certificate does not verify against'),
])
def test_a_driver_the_worker_does_not_trust_is_refused_with_the_reason(
    two_tls_workers, pki, ca, client, reason):
  start = time.monotonic()
  with pytest.raises(workers.WorkerRefusedError) as e:
    workers.create_worker_context(two_tls_workers.addresses,
                                  tls=_tls(pki, ca, client))
  assert str(e.value).startswith(f'TFF worker {two_tls_workers.addresses[0]}')
  assert reason in str(e.value)
  assert time.monotonic() - start < 10  # Not gRPC's 20 s connect timeout.
  # The front named the refused driver in its log.
  if ca == 'cluster':
    with open(os.path.join(two_tls_workers.log_dir, 'serve_0.log')) as f:
      assert ': refused: ' in f.read()


def test_a_plaintext_driver_is_refused_with_the_reason(two_tls_workers):
  with pytest.raises(workers.WorkerRefusedError,
                     match=re.escape(two_tls_workers.addresses[0]) +
                     r': it closed the plaintext connection: it serves TLS'):
    workers.create_worker_context(two_tls_workers.addresses)


def test_an_expired_worker_certificate_is_refused_by_the_driver(pki):
  cluster, expired = pki['cluster'], pki['expired']
  with served_workers.ServedWorkers(
      1, tls_ca=cluster['ca_cert'], tls_cert=expired['worker_cert'],
      tls_key=expired['worker_key']) as served:
    with pytest.raises(workers.WorkerRefusedError,
                       match=re.escape(served.addresses[0]) +
                       r': its certificate does not verify .*'
                       r'certificate has expired'):
      workers.create_worker_context(served.addresses, tls=_tls(pki))


def test_a_tls_driver_is_refused_by_a_plaintext_worker(two_workers, pki):
  with pytest.raises(workers.WorkerRefusedError,
                     match=re.escape(two_workers.addresses[0]) +
                     r': it does not speak TLS \(a plaintext TFF worker\?\)'):
    workers.create_worker_context(two_workers.addresses, tls=_tls(pki))


def test_the_workers_plaintext_port_is_not_reachable_beside_the_front(
    two_tls_workers):
  for address, port, pid in zip(two_tls_workers.addresses,
                                two_tls_workers.worker_ports,
                                two_tls_workers.worker_pids):
    host = address.rpartition(':')[0]
    # The worker listens on all interfaces, of a network namespace of its
    # own: from the front's interface its port is closed.
    with pytest.raises(ConnectionRefusedError):
      socket.create_connection((host, port), timeout=5).close()
    assert (os.readlink(f'/proc/{pid}/ns/net')
            != os.readlink('/proc/self/ns/net'))
    # The front itself answers.
    socket.create_connection((host, int(address.rpartition(':')[2])),
                             timeout=5).close()


def test_remote_addresses_need_tls_or_an_explicit_opt_in(pki):
  with pytest.raises(ValueError, match='not a loopback address.*'
                     'Connect with TLS'):
    workers.create_worker_context('192.0.2.1:8000')
  # With TLS the address is accepted; nothing listens there (TEST-NET-1).
  with pytest.raises(workers.WorkerUnavailableError,
                     match=r'192\.0\.2\.1:8000: not reachable within 1 s'):
    workers.create_worker_context('192.0.2.1:8000', tls=_tls(pki),
                                  connect_timeout_seconds=1)
