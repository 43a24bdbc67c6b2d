"""End-to-end runs of the hypergradient FedAvg binary with tiny settings."""

import json
import os

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

from research.hypergradient_fedavg import main as hypergradient_main
from tff_fad import local_workers
from tff_fad import served_workers
from tff_fad import worker_tls

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS(['test'])


TINY = dict(rounds=2, clients_per_round=3, num_clients=6, eval_every=1,
            batch_size=32)


def test_hypergradient_run_writes_outputs(tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path), **TINY):
    summary = hypergradient_main.run()
  for name in ('metrics.csv', 'accuracy_and_lr.png', 'summary.json'):
    assert (tmp_path / name).is_file(), name
  assert os.listdir(tmp_path / 'tensorboard')
  on_disk = json.loads((tmp_path / 'summary.json').read_text())
  assert on_disk['final_test_accuracy'] == summary['final_test_accuracy']
  assert 0.0 <= on_disk['final_test_accuracy'] <= 1.0
  assert on_disk['final_server_learning_rate'] > 0
  assert on_disk['communication_per_round']['round_trips'] == 1
  rows = (tmp_path / 'metrics.csv').read_text().splitlines()
  assert rows[0].startswith('round,')
  assert len(rows) == 1 + 3  # Header, the initial evaluation, two rounds.


def test_reverse_mode_on_two_tls_workers_gives_the_one_process_run(tmp_path):
  # The multi-machine recipe, on loopback: workers behind TLS fronts, the
  # driver's certificate and CA given by flags.
  flags_ = dict(TINY, rounds=3, fad_mode='reverse')
  with flagsaver.flagsaver(output_dir=str(tmp_path / 'one_process'),
                           **flags_):
    expected = hypergradient_main.run()
  pki = worker_tls.make_certificates(str(tmp_path / 'certs'), ['127.0.0.1'])
  with served_workers.ServedWorkers(
      2, tls_ca=pki['ca_cert'], tls_cert=pki['worker_cert'],
      tls_key=pki['worker_key']) as served:
    with flagsaver.flagsaver(output_dir=str(tmp_path / 'workers'),
                             workers=served.addresses,
                             worker_tls_ca=pki['ca_cert'],
                             worker_tls_cert=pki['driver_cert'],
                             worker_tls_key=pki['driver_key'], **flags_):
      actual = hypergradient_main.run()
  rates = actual['server_learning_rate_by_round']
  assert set(rates) == {'1', '2', '3'}
  for round_num, rate in expected['server_learning_rate_by_round'].items():
    assert rates[round_num] == pytest.approx(rate, rel=1e-5)
  assert actual['final_test_accuracy'] == pytest.approx(
      expected['final_test_accuracy'], abs=1e-3)
  assert actual['communication_per_round']['round_trips'] == 2


def test_fixed_rate_fedavg_baseline_runs(tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path), algorithm='fedavg',
                           **TINY):
    summary = hypergradient_main.run()
  assert summary['final_server_learning_rate'] == pytest.approx(0.1)
  assert summary['algorithm'] == 'fedavg'


@pytest.mark.parametrize('flag, value, message', [
    ('rounds', 0, '--rounds must be > 0'),
    ('dirichlet_alpha', 'lots', "--dirichlet_alpha must be 'iid' or a "
                                'positive number'),
    ('hyper_lr', -1.0, '--hyper_lr must be >= 0'),
    ('tangent_decay', 1.0, r'--tangent_decay must be in \[0, 1\)'),
    ('hyper_beta_1', -0.1, r'--hyper_beta_1 must be in \[0, 1\)'),
    ('hyper_beta_2', 1.0, r'--hyper_beta_2 must be in \[0, 1\)'),
])
def test_bad_flags_are_named(tmp_path, flag, value, message):
  with flagsaver.flagsaver(output_dir=str(tmp_path), **{flag: value}):
    with pytest.raises(ValueError, match=message):
      hypergradient_main.run()


def test_learned_weighting_run(tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path), weighting='learned',
                           post_update_loss='all_batches', **TINY):
    summary = hypergradient_main.run()
  assert summary['weighting'] == 'learned'
  assert summary['post_update_loss'] == 'all_batches'
  assert summary['final_weight_exponent'] is not None
  assert summary['communication_per_round']['round_trips'] == 1
  assert set(summary['server_learning_rate_by_round']) == {'1', '2'}


def test_learned_weighting_needs_forward_mode(tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path), weighting='learned',
                           fad_mode='reverse'):
    with pytest.raises(ValueError, match='--weighting=learned needs'):
      hypergradient_main.run()


def test_runs_are_reproducible_from_the_seed(tmp_path):
  summaries = []
  for name in ('a', 'b'):
    with flagsaver.flagsaver(output_dir=str(tmp_path / name), seed=3,
                             **TINY):
      summaries.append(hypergradient_main.run())
  # To float32 rounding: TFF's runtime adds client values in the order they
  # finish, so the last bits of a sum can differ between runs.
  for key in ('final_test_accuracy', 'final_central_test',
              'final_server_learning_rate', 'server_learning_rate_by_round'):
    assert summaries[0][key] == pytest.approx(summaries[1][key], rel=1e-5), key


def test_hyper_beta_2_reaches_the_hyper_optimizer(tmp_path):
  # Adam with beta_1 = beta_2 = 0 steps by hyper_lr * g / (|g| + eps): the
  # sign of the hypergradient, so log(lr) moves by exactly 0.1 in round 2
  # (round 1 has no earlier step, so no hypergradient).
  with flagsaver.flagsaver(output_dir=str(tmp_path), hyper_beta_2=0.0,
                           **TINY):
    summary = hypergradient_main.run()
  rates = summary['server_learning_rate_by_round']
  assert rates['2'] == pytest.approx(0.1, rel=1e-6)
  assert abs(np.log(summary['final_server_learning_rate'] / 0.1)) == (
      pytest.approx(0.1, rel=1e-4))


def test_server_adam_rate_is_learned(tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path), server_optimizer='adam',
                           server_lr=0.01, **TINY):
    summary = hypergradient_main.run()
  assert summary['server_optimizer'] == 'adam'
  assert summary['initial_server_learning_rate'] == pytest.approx(0.01)
  assert summary['final_server_learning_rate'] > 0
  assert summary['final_server_learning_rate'] != pytest.approx(0.01)


def test_dp_run_reports_the_epsilon_of_its_releases(tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path), aggregator='dp',
                           dp_noise_multiplier=1.0, **TINY):
    summary = hypergradient_main.run()
    expected = hypergradient_main.privacy(
        hypergradient_main.experiment.load_task(pad_digits_to_32x32=False)
        .model)
  privacy = json.loads((tmp_path / 'summary.json').read_text())['privacy']
  assert privacy == summary['privacy']
  assert privacy['epsilon'] == pytest.approx(expected.epsilon)
  assert 0 < privacy['epsilon'] < float('inf')
  assert privacy['sampling_rate'] == pytest.approx(3 / 6)
  assert privacy['rounds'] == 2
  # The loss, its derivative and the model update; no training metrics.
  assert len(privacy['releases_per_round']) == 3
  assert all(' dp: ' in r for r in privacy['releases_per_round'])


def test_dp_needs_forward_mode(tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path), aggregator='dp',
                           fad_mode='reverse'):
    with pytest.raises(ValueError, match='--aggregator=dp needs '
                       '--fad_mode=forward'):
      hypergradient_main.run()
