"""Tests of research/baffle/experiments.py: the table and a 1-round run."""

import json
import os

from absl import flags
from absl.testing import flagsaver
import pytest

import tff_fad  # pylint: disable=unused-import  # Stops leaked TFF workers.
from research.baffle import experiments

FLAGS = flags.FLAGS


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
