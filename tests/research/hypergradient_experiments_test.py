"""Tests of research/hypergradient_fedavg/experiments.py on 3-round runs."""

import json
import os

from absl import flags
from absl.testing import flagsaver
import pytest

import tff_fad  # pylint: disable=unused-import  # Stops leaked TFF workers.
from research.hypergradient_fedavg import experiments

FLAGS = flags.FLAGS
TINY = dict(rounds=3, clients_per_round=3, num_clients=6, batch_size=32)


@pytest.fixture(autouse=True, scope='module')
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS(['hypergradient_experiments_test'])
  yield


def test_rates_grid_averages_seeds_and_labels_each_row(tmp_path):
  out = str(tmp_path / 'rates')
  with flagsaver.flagsaver(
      output_dir=out, experiment='rates', fixed_rates=['1.0'],
      hypergradient_starts=['0.1'], tangent_decays=['0.0', '0.9'],
      seeds=['0', '1'], target_accuracy=0.0, hyper_lr=0.2, **TINY):
    experiments.main(['experiments'])
  with open(os.path.join(out, 'table.json')) as f:
    rows = json.load(f)
  assert [(r['algorithm'], r['server_optimizer'], r['initial_server_lr'],
           r['tangent_decay'], r['post_update_loss'], r['hyper_optimizer'])
          for r in rows] == [
              ('fedavg', 'sgd', 1.0, None, None, None),
              ('hypergradient', 'sgd', 0.1, 0.0, 'first_batch',
               'Adam 0.2, beta_1 0'),
              ('hypergradient', 'sgd', 0.1, 0.9, 'first_batch',
               'Adam 0.2, beta_1 0')]
  summaries = {}
  for seed in ('0', '1'):
    run_dir = os.path.join(
        out, 'algorithmhypergradient_server_lr0.1_tangent_decay0.9_'
        f'post_update_lossfirst_batch_seed{seed}')
    with open(os.path.join(run_dir, 'summary.json')) as f:
      summaries[seed] = json.load(f)
  assert rows[2]['final_test_accuracy'] == pytest.approx(
      (summaries['0']['final_test_accuracy'] +
       summaries['1']['final_test_accuracy']) / 2)
  assert rows[2]['final_test_accuracy_per_seed'] == [
      summaries[seed]['final_test_accuracy'] for seed in ('0', '1')]
  assert rows[2]['wall_seconds'] > 0
  # Target 0: every run reaches it at the initial evaluation, per seed.
  assert all(r['rounds_to_target'] == [0, 0] for r in rows)
  # Round 1 has no pending step and round 2 no earlier one: the greedy and
  # carried rates part in round 3.
  assert rows[1]['final_server_lr'] != rows[2]['final_server_lr']
  assert os.path.getsize(os.path.join(out, 'learned_rates.png')) > 0
  with open(os.path.join(out, 'table.md')) as f:
    lines = f.read().splitlines()
  assert lines[0].startswith(
      '| algorithm | server optimizer | client weighting | server lr '
      '(initial) | hyper-optimizer | tangent decay | post-update loss |')
  assert lines[2].startswith(
      '| FedAvg, fixed lr | sgd | example_count | 1 | - | - | - |')
  assert lines[4].startswith(
      '| hypergradient FedAvg | sgd | example_count | 0.1 | '
      'Adam 0.2, beta_1 0 | 0.9 | first_batch | ')
  assert len(lines) == 5


def test_seed_means_skip_what_does_not_apply():
  runs = [dict(final_weight_exponent=-0.2, weighting='learned'),
          dict(final_weight_exponent=0.1, weighting='learned')]
  assert experiments._mean(runs, 'final_weight_exponent') == pytest.approx(
      -0.05)
  assert experiments._mean([dict(final_weight_exponent=None)] * 2,
                           'final_weight_exponent') is None
