"""End-to-end test of research/baffle/main.py with tiny settings."""

import csv
import json
import os

from absl import app
from absl import flags
from absl.testing import flagsaver
import pytest

import tff_fad  # pylint: disable=unused-import  # Stops leaked TFF workers.
from research import experiment
from research.baffle import main as baffle_main

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True, scope='module')
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS(['baffle_main_test'])
  yield


_TINY = dict(K=4, rounds=2, clients_per_round=2, num_clients=4,
             batch_size=8, eval_every=1, dirichlet_alpha='iid')


def test_end_to_end_writes_outputs(tmp_path, capfd):
  # capfd, not capsys: TFF hands sys.stdout's file descriptor to its worker.
  out = str(tmp_path / 'run')
  with flagsaver.flagsaver(output_dir=out, estimator='central', ema=0.5,
                           log_gradient_cosine=True, **_TINY):
    baffle_main.main(['main'])
  printed = capfd.readouterr().out
  assert 'Final test accuracy (central):' in printed and out in printed
  assert 'round    2/2' in printed and 'test_acc' in printed

  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  assert 0.0 <= summary['final_test_accuracy'] <= 1.0
  assert summary['rounds'] == 2
  # From communication_cost: K float32 scores times their aggregation weight
  # and the weight (the weighted mean), and the model's three metric sums
  # (loss, correct predictions, examples).
  assert summary['upload_bytes_per_client_per_round'] == 4 * (4 + 1 + 3)
  assert summary['test_accuracy_from'] == 'central'
  assert 0.0 <= summary['final_federated_test']['accuracy'] <= 1.0
  assert summary['flags']['K'] == 4 and summary['flags']['output_dir'] == out
  assert set(summary['accuracy_by_round']) == {'0', '1', '2'}
  # --ema: the raw weights are evaluated too; at round 0 they are the EMA's.
  without_ema = summary['accuracy_by_round_without_ema']
  assert set(without_ema) == {'0', '1', '2'}
  assert without_ema['0'] == summary['accuracy_by_round']['0']
  assert summary['final_test_accuracy_without_ema'] == without_ema['2']
  # --log_gradient_cosine at each evaluation; K=4 shared directions for the
  # linear model's 7,850 weights.
  assert set(summary['gradient_cosine_by_round']) == {'0', '1', '2'}
  assert all(-1.0 <= c <= 1.0
             for c in summary['gradient_cosine_by_round'].values())
  assert summary['expected_gradient_cosine'] == pytest.approx(
      (4 / 7850) ** 0.5)
  # Shared directions: the prediction needs no client gradient norms.
  predicted = summary['predicted_gradient_cosine_by_round']
  assert set(predicted) == {'0', '1', '2'}
  assert list(predicted.values()) == pytest.approx(
      [(4 / (4 + 7851)) ** 0.5] * 3)

  with open(os.path.join(out, 'metrics.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['round'] for r in rows] == ['0', '1', '2']
  assert 'client_work/train/loss' in rows[1]
  assert 'evaluation/central/accuracy' in rows[2]
  assert 'evaluation/federated/accuracy' in rows[2]
  with open(os.path.join(out, 'accuracy.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert any(name.startswith('events.out.tfevents')
             for _, _, files in os.walk(os.path.join(out, 'tensorboard'))
             for name in files)


def test_dp_aggregator_runs_and_reports_epsilon(tmp_path, capfd):
  # The budget recipe (shared directions, K=10 central, LeNet) through DP,
  # on a budget of one round (21 passes).
  out = str(tmp_path / 'dp')
  tiny_clients = dict(clients_per_round=2, num_clients=4, batch_size=8,
                      eval_every=1)
  with flagsaver.flagsaver(output_dir=out, aggregator='dp', recipe='budget',
                           forward_passes=21, **tiny_clients):
    baffle_main.main(['main'])
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['flags']['aggregator'] == 'dp'
  assert summary['flags']['model'] == 'lenet'
  assert summary['flags']['estimator'] == 'central'
  assert summary['flags']['directions'] == 'shared'
  assert summary['rounds'] == 1
  assert 0.0 <= summary['final_test_accuracy'] <= 1.0
  # One DP release of the K scores a round; the metrics are not released.
  privacy = summary['privacy']
  assert privacy['releases_per_round'] == ['value dp: scores (model_aggregator)']
  assert privacy['sampling_rate'] == 0.5 and privacy['rounds'] == 1
  assert 0 < privacy['epsilon'] < float('inf')
  assert summary['final_train_accuracy'] is None
  printed = capfd.readouterr().out
  assert f"({privacy['epsilon']:.4g}, 1e-05)-DP over 1 rounds" in printed


def test_forward_pass_budget_sets_the_rounds(tmp_path, capfd):
  out = str(tmp_path / 'budget')
  # central, K=4: 2 * 4 + 1 = 9 passes a round; 40 pay for 4 rounds.
  tiny = {k: v for k, v in _TINY.items() if k != 'rounds'}
  with flagsaver.flagsaver(output_dir=out, estimator='central',
                           forward_passes=40, **tiny):
    summary = baffle_main.run()
  assert summary['rounds'] == 4
  assert summary['forward_passes_per_client_per_round'] == 9
  assert summary['forward_passes_per_client'] == 36
  assert 0.0 <= summary['final_train_accuracy'] <= 1.0
  assert '36 forward passes per client' in capfd.readouterr().out


def test_rejects_stray_arguments(tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path)):
    with pytest.raises(app.UsageError, match='stray'):
      baffle_main.main(['main', 'stray'])


@pytest.mark.parametrize('overrides, flag_name', [
    (dict(K=0), '--K'),
    (dict(sigma=-1.0), '--sigma'),
    (dict(rounds=0), '--rounds'),
    (dict(clients_per_round=9, num_clients=4), '--clients_per_round'),
    (dict(dirichlet_alpha='skewed'), '--dirichlet_alpha'),
    (dict(dirichlet_alpha='0'), '--dirichlet_alpha'),
    (dict(ema=1.0), '--ema'),
    (dict(directions='per_client', aggregator='dp'), '--directions'),
    (dict(directions='per_client', mode='one_epoch'), '--directions'),
    (dict(output_dir=''), '--output_dir'),
    (dict(momentum=1.0, optimizer='sgd'), '--momentum'),
    (dict(momentum=0.9), '--momentum applies to'),
    (dict(warmup_rounds=200), '--warmup_rounds=200 must be below'),
    (dict(forward_passes=100, epochs=2), '--epochs and --forward_passes'),
    (dict(forward_passes=100, rounds=2), '--rounds and --forward_passes'),
    (dict(recipe='budget', rounds=2, epochs=2), '--rounds and --epochs'),
    (dict(dp_delta=1.0), '--dp_delta'),
])
def test_bad_flag_values_name_the_flag(tmp_path, overrides, flag_name):
  values = dict(output_dir=str(tmp_path))
  values.update(overrides)
  with flagsaver.flagsaver(**values):
    with pytest.raises(ValueError, match=flag_name):
      baffle_main.run()
  assert not os.listdir(tmp_path)  # Failed before writing anything.


def test_task_data_offline_exits_with_message_not_traceback(tmp_path, capsys,
                                                             monkeypatch):
  def offline(name, **unused_kwargs):
    raise experiment.tasks.TaskDataUnavailableError(
        f'{name}: no network; copy the file')

  monkeypatch.setattr(experiment.tasks, 'load_baseline_task', offline)
  with flagsaver.flagsaver(output_dir=str(tmp_path / 'e'),
                           task='emnist_character'):
    with pytest.raises(SystemExit) as info:
      baffle_main.main(['main'])
  assert info.value.code == 2
  assert 'emnist_character: no network; copy the file' in (
      capsys.readouterr().err)


def test_paper_recipe_sets_the_official_flags_and_explicit_ones_win(
    tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path), recipe='paper', K=4):
    applied = baffle_main.apply_recipe()
    assert 'K' not in applied  # Given explicitly.
    assert FLAGS.K == 4 and FLAGS.model == 'lenet' and FLAGS.lr == 1e-2
    assert FLAGS.adam_beta2 == 0.99 and FLAGS.weight_decay == 5e-4
    assert FLAGS.client_clip == 0.3 and FLAGS.clip == 0.0
    assert FLAGS.ema == 0.995 and FLAGS.ema_warmup and FLAGS.ema_every == 0
    assert FLAGS.resize_digits and FLAGS.epochs == 20
    assert FLAGS.num_clients == FLAGS.clients_per_round == 10
    assert FLAGS.directions == 'per_client'
  with flagsaver.flagsaver(output_dir=str(tmp_path), recipe='paper',
                           mode='one_epoch'):
    baffle_main.apply_recipe()
    assert FLAGS.lr == 1.0 and FLAGS.client_optimizer == 'adam'
    assert FLAGS.directions == 'shared'  # one_epoch clients draw their own.
  with flagsaver.flagsaver(output_dir=str(tmp_path)):
    assert baffle_main.apply_recipe() == {}
    assert FLAGS.model == 'linear' and FLAGS.adam_beta2 == 0.999


def test_paper_recipe_runs_an_epoch(tmp_path):
  out = str(tmp_path / 'paper')
  # 4 clients of 1,000 digits, batch 200: an epoch is 5 rounds.
  with flagsaver.flagsaver(output_dir=out, recipe='paper', K=4, epochs=1,
                           num_clients=4, clients_per_round=2,
                           batch_size=200, eval_every=5):
    baffle_main.main(['main'])
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['rounds'] == 5
  assert summary['flags']['recipe'] == 'paper'
  assert summary['flags']['resize_digits'] is True
  assert summary['flags']['adam_beta2'] == 0.99
  # Per-client directions: K scores + the client's 8-byte seed + the
  # aggregation weight + 3 metric sums.
  assert summary['upload_bytes_per_client_per_round'] == 4 * (4 + 1 + 3) + 8
  assert 0.0 <= summary['final_test_accuracy'] <= 1.0


@pytest.mark.parametrize('recipe', ['paper', 'budget'])
@pytest.mark.parametrize('length', [dict(rounds=3), dict(epochs=2),
                                    dict(forward_passes=500)])
def test_a_run_length_given_explicitly_replaces_the_recipes(
    tmp_path, recipe, length):
  # --recipe=paper sets --epochs=20 and --recipe=budget --forward_passes:
  # with --rounds given as well, the recipe's length silently won, or the
  # two were refused as if the user had given both.
  with flagsaver.flagsaver(output_dir=str(tmp_path), recipe=recipe, **length):
    baffle_main.validate_flags()
    for name in ('rounds', 'epochs', 'forward_passes'):
      if name not in length and name != 'rounds':
        assert not FLAGS[name].value, name
    (name, value), = length.items()
    assert FLAGS[name].value == value
