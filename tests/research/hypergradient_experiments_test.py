"""Tests of research/hypergradient_fedavg/experiments.py on 3-round runs."""

import json
import os

from absl import flags
from absl.testing import flagsaver
import numpy as np
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


def test_learned_rates_plot_draws_the_runs_of_plot_with(tmp_path,
                                                        monkeypatch):
  sgd, adam = str(tmp_path / 'sgd'), str(tmp_path / 'adam')
  with flagsaver.flagsaver(output_dir=sgd, experiment='rates',
                           fixed_rates=['1.0'], hypergradient_starts=[],
                           model='lenet', **TINY):
    experiments.main(['experiments'])
  panels = []
  plot = experiments.plot_learned_rates
  monkeypatch.setattr(experiments, 'plot_learned_rates',
                      lambda *args: panels.extend(plot(*args)))
  with flagsaver.flagsaver(output_dir=adam, experiment='rates',
                           server_optimizer='adam', fixed_rates=[],
                           hypergradient_starts=['0.01'],
                           tangent_decays=['0.9'], plot_with=[sgd], **TINY):
    experiments.main(['experiments'])
  assert panels == [('lenet (26,730 params) on digits', 'sgd'),
                    ('linear (7,850 params) on digits', 'adam')]
  with open(os.path.join(adam, 'table.json')) as f:
    assert [r['task'] for r in json.load(f)] == [
        'linear (7,850 params) on digits']
  assert os.path.getsize(os.path.join(adam, 'learned_rates.png')) > 0


def test_a_run_finished_with_the_same_flags_is_kept_not_rerun(
    tmp_path, monkeypatch):
  out = str(tmp_path / 'rates')
  grid = dict(output_dir=out, experiment='rates', fixed_rates=['1.0'],
              hypergradient_starts=[], **TINY)
  with flagsaver.flagsaver(**grid):
    experiments.main(['experiments'])
  with open(os.path.join(out, 'table.json')) as f:
    first = json.load(f)

  def rerun():
    raise AssertionError('rerun')

  monkeypatch.setattr(experiments.hypergradient_main, 'run', rerun)
  with flagsaver.flagsaver(**grid):
    experiments.main(['experiments'])
  with open(os.path.join(out, 'table.json')) as f:
    assert json.load(f) == first  # Its wall time too.
  for changed in (dict(overwrite=True), dict(rounds=4)):
    with flagsaver.flagsaver(**{**grid, **changed}):
      with pytest.raises(AssertionError, match='rerun'):
        experiments.main(['experiments'])


def test_plot_with_is_checked_before_any_training(tmp_path):
  out = str(tmp_path / 'out')
  with flagsaver.flagsaver(output_dir=out, experiment='rates',
                           plot_with=[str(tmp_path / 'typo')], **TINY):
    with pytest.raises(ValueError, match='typo.* is not a directory of runs'):
      experiments.run_experiment()
  os.makedirs(tmp_path / 'empty')
  with flagsaver.flagsaver(output_dir=out, experiment='rates',
                           plot_with=[str(tmp_path / 'empty')], **TINY):
    with pytest.raises(ValueError, match='holds no finished run'):
      experiments.run_experiment()
  with flagsaver.flagsaver(output_dir=out, experiment='weighting',
                           plot_with=[str(tmp_path / 'empty')], **TINY):
    with pytest.raises(ValueError, match='--plot_with is for --experiment=rates'):
      experiments.run_experiment()
  assert not os.path.exists(out)


def test_hyper_optimizer_names_beta_2_when_not_tffs_default():
  run_flags = dict(hyper_lr=0.1, hyper_beta_1=0.0, hyper_beta_2=0.999)
  assert experiments._hyper_optimizer(run_flags) == 'Adam 0.1, beta_1 0'
  assert experiments._hyper_optimizer(dict(run_flags, hyper_beta_2=0.0)) == (
      'Adam 0.1, beta_1 0, beta_2 0')


def test_target_is_reached_by_a_float32_accuracy_equal_to_it():
  nine_of_ten = float(np.float32(9) / np.float32(10))  # 0.8999999761...
  assert nine_of_ten < 0.9
  by_round = {'0': 0.1, '1': 0.8, '2': nine_of_ten, '3': 1.0}
  assert experiments._first_round_reaching(by_round, 0.9) == 2
  assert experiments._first_round_reaching(by_round, 0.95) == 3
  assert experiments._first_round_reaching(by_round, 1.01) is None


def test_seed_means_skip_what_does_not_apply():
  runs = [dict(final_weight_exponent=-0.2, weighting='learned'),
          dict(final_weight_exponent=0.1, weighting='learned')]
  assert experiments._mean(runs, 'final_weight_exponent') == pytest.approx(
      -0.05)
  assert experiments._mean([dict(final_weight_exponent=None)] * 2,
                           'final_weight_exponent') is None
