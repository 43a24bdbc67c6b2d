"""Tests of research/baffle/experiments.py: the table and a 1-round run."""

import collections
import json
import os
import pathlib

from absl import flags
from absl.testing import flagsaver
import pytest

import tff_fad  # pylint: disable=unused-import  # Stops leaked TFF workers.
from research.baffle import experiments

FLAGS = flags.FLAGS
_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope='module')
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS(['baffle_experiments_test'])
  yield


def test_make_table_formats_rows_and_missing_rounds():
  rows = [
      dict(method='BAFFLE', K=100, estimator='jvp', final_test_accuracy=0.5,
           accuracy_by_round={'0': 0.1, '10': 0.5}, upload_bytes=408,
           wall_time_seconds=12.3),
      dict(method='FedSGD (backprop)', K=None, estimator=None,
           final_test_accuracy=0.75, accuracy_by_round={'0': 0.1, '5': 0.6},
           upload_bytes=31400, wall_time_seconds=4.0),
  ]
  lines = experiments.make_table(rows, [5, 10]).splitlines()
  assert lines[0] == (
      '| method | K | estimator | final test accuracy | acc @ round 5 | '
      'acc @ round 10 | upload bytes / client / round | wall time (s) |')
  assert lines[1] == '|---|---|---|---|---|---|---|---|'
  assert lines[2] == '| BAFFLE | 100 | jvp | 0.5000 | - | 0.5000 | 408 | 12 |'
  assert lines[3] == ('| FedSGD (backprop) | - | - | 0.7500 | 0.6000 | - | '
                      '31,400 | 4 |')


def test_one_round_grid_writes_table(tmp_path):
  out = str(tmp_path / 'exp')
  with flagsaver.flagsaver(
      output_dir=out, Ks=['4'], estimators=['forward', 'jvp'],
      baselines=['fedsgd', 'fedavg'], rounds=1, clients_per_round=2,
      num_clients=4, batch_size=8, eval_every=1, dirichlet_alpha='iid'):
    experiments.main(['experiments'])
  with open(os.path.join(out, 'table.json')) as f:
    rows = json.load(f)['rows']
  assert [(r['method'], r['K'], r['estimator']) for r in rows] == [
      ('BAFFLE', 4, 'forward'), ('BAFFLE', 4, 'jvp'),
      ('FedSGD (backprop)', None, None),
      ('FedAvg (backprop, 1 epoch)', None, None)]
  for r in rows:
    assert list(r) == list(rows[0])  # One layout for BAFFLE and baselines.
    assert r['wall_time_seconds_before_resuming'] == 0  # Not resumed.
    assert set(r['accuracy_by_round']) == {'0', '1'}
    assert 0.0 <= r['final_test_accuracy'] <= 1.0
  # BAFFLE uploads K float32 scores plus a few float32 weights and metrics;
  # the backprop baselines upload at least the 7,850 float32 weights.
  assert rows[0]['upload_bytes'] == rows[1]['upload_bytes']
  assert 4 * 4 < rows[0]['upload_bytes'] <= 4 * 4 + 32
  assert rows[2]['upload_bytes'] > 4 * 7850
  assert rows[3]['upload_bytes'] > 4 * 7850
  with open(os.path.join(out, 'table.md')) as f:
    text = f.read()
  assert 'acc @ round 1' in text and text.count('\n| ') == 5


_PAPER_FIELDS = ('model', 'method', 'K', 'directions', 'estimator', 'mode',
                 'ema', 'activation', 'epochs', 'rounds',
                 'final_test_accuracy', 'wall_seconds')


def test_paper_grid_writes_rows_table_and_plot_and_keeps_finished_runs(
    tmp_path, capfd):
  out = str(tmp_path / 'paper')
  # 4 clients of 1,000 digits, batch 200: an epoch is 5 FedSGD rounds.
  tiny = dict(output_dir=out, experiment='paper', epochs=1, K=4,
              num_clients=4, clients_per_round=2, batch_size=200,
              paper_runs=['baffle_lenet_K100_shared', 'fedavg_lenet'])
  with flagsaver.flagsaver(**tiny):
    experiments.main(['experiments'])
  with open(os.path.join(out, 'paper.json')) as f:
    rows = json.load(f)
  for row in rows:
    assert tuple(row)[1:1 + len(_PAPER_FIELDS)] == _PAPER_FIELDS
  assert [(r['run'], r['method'], r['ema']) for r in rows] == [
      ('baffle_lenet_K100_shared', 'baffle', True),
      ('baffle_lenet_K100_shared', 'baffle', False),
      ('fedavg_lenet', 'fedavg', None)]
  baffle_ema, baffle_raw, fedavg = rows
  assert baffle_ema['K'] == 4 and baffle_ema['directions'] == 'shared'
  assert baffle_ema['estimator'] == 'forward'
  assert baffle_ema['mode'] == 'fedsgd' and baffle_ema['model'] == 'lenet'
  assert baffle_ema['activation'] == 'hardswish'
  assert (baffle_ema['epochs'], baffle_ema['rounds']) == (1, 5)
  assert set(baffle_ema['accuracy_by_round']) == {'0', '5'}
  assert set(baffle_ema['gradient_cosine_by_round']) == {'0', '5'}
  assert set(baffle_ema['predicted_gradient_cosine_by_round']) == {'0', '5'}
  # One run, two views of it: the EMA and the weights it averages.
  assert baffle_raw['wall_seconds'] == baffle_ema['wall_seconds']
  # FedAvg: one local epoch per round, so 1 epoch is 1 round.
  assert (fedavg['epochs'], fedavg['rounds']) == (1, 1)
  assert fedavg['K'] is None and fedavg['directions'] is None
  # The BAFFLE run used the official recipe.
  with open(os.path.join(out, 'baffle_lenet_K100_shared',
                         'summary.json')) as f:
    summary = json.load(f)
  assert baffle_ema['accuracy_by_round'] == summary['accuracy_by_round']
  assert baffle_raw['accuracy_by_round'] == (
      summary['accuracy_by_round_without_ema'])
  assert baffle_raw['final_test_accuracy'] == (
      summary['final_test_accuracy_without_ema'])
  flags_used = summary['flags']
  assert flags_used['recipe'] == 'paper' and flags_used['resize_digits']
  assert flags_used['client_clip'] == 0.3 and flags_used['ema_warmup']
  with open(os.path.join(out, 'paper.md')) as f:
    assert f.read().count('\n| lenet |') == 3
  with open(os.path.join(out, 'paper.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  # Finished runs are kept, not rerun.
  capfd.readouterr()
  with flagsaver.flagsaver(**tiny):
    experiments.main(['experiments'])
  assert 'fedavg_lenet: in ' in capfd.readouterr().out
  with open(os.path.join(out, 'paper.json')) as f:
    assert json.load(f) == rows


_BUDGET_FIELDS = ('forward_passes_per_client', 'backward_passes_per_client',
                  'train_accuracy', 'optimizer', 'lr', 'schedule')


def test_budget_grid_spends_the_budget_and_writes_rows_table_and_plot(
    tmp_path, monkeypatch, capfd):
  out = str(tmp_path / 'budget')
  # The grid's machinery on a tiny budget: 3 rounds of K=10 central
  # (21 passes each), and FedSGD for the same rounds.
  monkeypatch.setattr(experiments, 'BUDGET_RUNS', collections.OrderedDict([
      ('baffle_tiny', dict(forward_passes=70, eval_every=1)),
      ('fedsgd_tiny', dict(method='fedsgd', rounds=3, eval_every=1)),
  ]))
  tiny = dict(output_dir=out, experiment='budget', num_clients=4,
              clients_per_round=2, batch_size=200)
  with flagsaver.flagsaver(**tiny):
    experiments.main(['experiments'])
  with open(os.path.join(out, 'budget.json')) as f:
    rows = json.load(f)
  baffle_row, fedsgd_row = rows
  for row in rows:
    assert tuple(row)[1:1 + len(_PAPER_FIELDS)] == _PAPER_FIELDS
    assert set(_BUDGET_FIELDS) <= set(row)
    assert 0.0 <= row['train_accuracy'] <= 1.0
    assert set(row['accuracy_by_round']) == {'0', '1', '2', '3'}
  assert (baffle_row['K'], baffle_row['estimator']) == (10, 'central')
  assert baffle_row['directions'] == 'shared' and baffle_row['rounds'] == 3
  assert baffle_row['forward_passes_per_client'] == 63
  assert baffle_row['backward_passes_per_client'] == 0
  assert baffle_row['optimizer'] == 'adam(0.97, 0.999)'
  assert (baffle_row['lr'], baffle_row['schedule']) == (0.01, 'cosine')
  # FedSGD: a forward and a backward pass per round, the same server.
  assert fedsgd_row['rounds'] == 3
  assert fedsgd_row['forward_passes_per_client'] == 3
  assert fedsgd_row['backward_passes_per_client'] == 3
  assert fedsgd_row['optimizer'] == baffle_row['optimizer']
  with open(os.path.join(out, 'baffle_tiny', 'summary.json')) as f:
    summary = json.load(f)
  assert summary['flags']['recipe'] == 'budget'
  assert summary['final_test_accuracy'] == baffle_row['final_test_accuracy']
  with open(os.path.join(out, 'budget.md')) as f:
    table = f.read()
  assert table.count('\n| ') == 2 and '| 63 |' in table
  assert '| 3 + 3 |' in table
  with open(os.path.join(out, 'budget.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  capfd.readouterr()
  with flagsaver.flagsaver(**tiny):
    experiments.main(['experiments'])
  assert 'baffle_tiny: in ' in capfd.readouterr().out


def test_paper_grid_names_an_unknown_run(tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path), experiment='paper',
                           paper_runs=['baffle_vgg']):
    with pytest.raises(ValueError, match="'baffle_vgg' is not one of"):
      experiments.run_experiment()
  assert not os.listdir(tmp_path)


def test_experiment_flag_is_shared_with_the_hypergradient_script(tmp_path):
  # Both scripts in one process (as in this test run): one --experiment.
  from research.hypergradient_fedavg import experiments as hypergradient  # pylint: disable=g-import-not-at-top
  assert hypergradient.EXPERIMENTS == ('rates', 'weighting')
  with flagsaver.flagsaver(output_dir=str(tmp_path), experiment='rates'):
    with pytest.raises(ValueError, match="--experiment='rates' is not one "
                       "of this script's experiments: estimators, paper"):
      experiments.run_experiment()
  assert not os.listdir(tmp_path)


def test_committed_paper_results_have_the_fields_and_are_the_readme_table():
  rows = json.loads(
      (_ROOT / 'research' / 'baffle' / 'results' / 'paper.json').read_text())
  for row in rows:
    assert set(_PAPER_FIELDS) <= set(row), row['run']
    assert row['method'] in ('baffle', 'fedsgd', 'fedavg')
  assert {row['directions'] for row in rows} == {'per_client', 'shared', None}
  # The README's table is the one these rows make, so neither drifts.
  assert experiments.make_paper_table(rows) in (_ROOT / 'README.md').read_text()


def test_committed_budget_results_have_the_fields_and_are_the_readme_table():
  rows = json.loads(
      (_ROOT / 'research' / 'baffle' / 'results' / 'budget.json').read_text())
  for row in rows:
    assert set(_PAPER_FIELDS) <= set(row), row['run']
    for field in ('forward_passes_per_client', 'backward_passes_per_client',
                  'optimizer', 'schedule', 'train_accuracy'):
      assert field in row, (row['run'], field)
    assert row['forward_passes_per_client'] <= 130_000, row['run']
  assert experiments.make_budget_table(rows) in (
      _ROOT / 'README.md').read_text()
