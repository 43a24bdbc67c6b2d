"""End-to-end test of research/dp_hypergradient/main.py with tiny settings."""

import json
import math
import re

from absl import app
import pytest

import tff_fad  # pylint: disable=unused-import  # Stops leaked TFF workers.
from research.dp_hypergradient import main as dp_main


@pytest.fixture
def tiny_flags():
  dp_main.parse_flags(['main', '--rounds=2', '--num_clients=4',
                       '--examples_per_client=4', '--sampling_rate=0.1'])
  yield
  dp_main.FLAGS.unparse_flags()


def test_trains_and_reports_three_dp_releases_per_round(tiny_flags, capfd):
  del tiny_flags  # Used for its flags.
  report = dp_main.run()
  printed = capfd.readouterr().out
  assert 'round   2:' in printed and '(epsilon, delta)' in printed
  # The model update, the loss and the hypergradient (the loss's tangent).
  assert sorted((r.kind, r.mechanism) for r in report.releases) == [
      ('tangent', 'dp'), ('value', 'dp'), ('value', 'dp')]
  assert report.rounds == 2 and 0 < report.epsilon < math.inf


def test_output_dir_holds_the_rounds_and_the_privacy_report(tmp_path, capfd):
  output_dir = tmp_path / 'dp'
  dp_main.parse_flags(['main', '--rounds=2', '--num_clients=4',
                       '--examples_per_client=4', '--sampling_rate=0.1',
                       f'--output_dir={output_dir}'])
  try:
    report = dp_main.run()
  finally:
    dp_main.FLAGS.unparse_flags()
  printed = capfd.readouterr().out
  rows = (output_dir / 'metrics.csv').read_text().splitlines()
  assert rows[0] == 'round,loss,hypergradient,server_learning_rate'
  assert [r.split(',')[0] for r in rows[1:]] == ['1', '2']
  loss = float(rows[2].split(',')[1])
  assert f'round   2: loss {loss:8.4f}' in printed
  summary = json.loads((output_dir / 'summary.json').read_text())
  assert summary['privacy']['epsilon'] == report.epsilon
  assert summary['privacy']['rounds'] == 2
  assert len(summary['privacy']['releases_per_round']) == 3
  assert summary['flags']['rounds'] == 2
  assert summary['final_loss'] == loss


def test_stray_arguments_are_rejected():
  with pytest.raises(app.UsageError, match='stray'):
    dp_main.main(['main', 'stray'])


@pytest.mark.parametrize('flag, message', [
    ('--rounds=0', 'flag --rounds=0: 0 is not a positive integer'),
    ('--sampling_rate=0',
     r'flag --sampling_rate=0.0: must be a finite number in \(0, 1\]'),
    ('--delta=1', r'flag --delta=1.0: must be a finite number in \(0, 1\)'),
    ('--update_clip=0', 'flag --update_clip=0.0: must be a finite number > 0'),
    ('--loss_clip=inf', 'flag --loss_clip=inf: must be a finite number > 0'),
    ('--noise_multiplier=-1',
     'flag --noise_multiplier=-1.0: must be a finite number >= 0'),
    ('--noise_multiplier=nan',
     'flag --noise_multiplier=nan: must be a finite number >= 0'),
])
def test_a_bad_flag_is_a_one_line_error_when_parsed(flag, message, capsys):
  try:
    with pytest.raises(SystemExit) as exit_info:
      dp_main.parse_flags(['main', flag])
  finally:
    dp_main.FLAGS.unparse_flags()
  assert exit_info.value.code == 1
  printed = capsys.readouterr().err
  assert re.match('FATAL Flags parsing error: ' + message, printed), printed
  assert printed.count('\n') == 1
