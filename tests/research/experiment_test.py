"""Tests of the binaries' shared plumbing: tasks, evaluation, workers."""

import asyncio
import re

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow_federated as tff

from research import experiment
from research import run_dir
from research import tasks
from research.baffle import experiments as baffle_experiments
from research.baffle import main as baffle_main
from research.hypergradient_fedavg import experiments as hypergradient_experiments
from research.hypergradient_fedavg import main as hypergradient_main
from tff_fad import local_workers

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True, scope='module')
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS(['experiment_test'])


@pytest.mark.parametrize('values, message', [
    (dict(workers=['10.1.2.3:8000']),
     "--workers: Worker address '10.1.2.3:8000' is not a loopback address"),
    (dict(workers=['localhost']), "--workers: Worker address 'localhost' is "
                                  'not host:port'),
    (dict(save_every=-1), '--save_every must be >= 0, got -1'),
    (dict(worker_tls_cert='driver.pem', worker_tls_key='driver.key'),
     '--worker_tls_cert / --worker_tls_key need --worker_tls_ca'),
    (dict(worker_tls_ca=__file__, worker_tls_cert='driver.pem'),
     'Give --worker_tls_cert and --worker_tls_key together'),
    (dict(worker_tls_ca='/no/such/ca.pem'),
     "--worker_tls_ca / --worker_tls_cert / --worker_tls_key: ca_cert: no "
     "such file '/no/such/ca.pem'"),
])
def test_bad_execution_flags_are_named(values, message):
  with flagsaver.flagsaver(**values):
    with pytest.raises(ValueError, match=message):
      experiment.validate_execution_flags()


@pytest.mark.parametrize('main, values, message', [
    # --server_lr=inf trained to NaN and exited 0.
    (hypergradient_main, dict(server_lr=float('inf')),
     '--server_lr must be a finite number'),
    (hypergradient_main, dict(hyper_lr=float('nan')),
     '--hyper_lr must be a finite number'),
    (hypergradient_main, dict(initial_weight_exponent=1e39),
     '--initial_weight_exponent must be a finite number .in float32.'),
    (baffle_main, dict(sigma=float('inf')), '--sigma must be a finite number'),
])
def test_non_finite_float_flags_are_refused_before_any_work(
    main, values, message, tmp_path):
  output_dir = tmp_path / 'run'
  with flagsaver.flagsaver(output_dir=str(output_dir), **values):
    with pytest.raises(ValueError, match=message):
      main.run()
  assert not output_dir.exists()


def test_remote_workers_need_the_opt_in_flag():
  with flagsaver.flagsaver(workers=['10.1.2.3:8000'],
                           allow_remote_workers=True):
    experiment.validate_execution_flags()


def test_remote_workers_are_accepted_over_tls(tmp_path):
  from tff_fad import worker_tls  # pylint: disable=g-import-not-at-top
  pki = worker_tls.make_certificates(str(tmp_path), ['10.1.2.3'])
  with flagsaver.flagsaver(workers=['10.1.2.3:8000'],
                           worker_tls_ca=pki['ca_cert'],
                           worker_tls_cert=pki['driver_cert'],
                           worker_tls_key=pki['driver_key']):
    experiment.validate_execution_flags()
    tls = experiment.worker_tls_settings()
  assert (tls.ca_cert, tls.cert, tls.key) == (
      pki['ca_cert'], pki['driver_cert'], pki['driver_key'])


@pytest.mark.parametrize('main, values, message', [
    (baffle_main.main, dict(rounds=0), '--rounds must be > 0, got 0.'),
    (baffle_main.main, dict(output_dir=None), '--output_dir is required'),
    (baffle_main.main, dict(ema=1.0), r'--ema must be in \[0, 1\), got 1.0.'),
    (baffle_main.main, dict(directions='per_client', mode='one_epoch'),
     '--directions=per_client applies to --mode=fedsgd'),
    (hypergradient_main.main, dict(tangent_decay=1.0),
     r'--tangent_decay must be in \[0, 1\), got 1.0.'),
    (hypergradient_main.main, dict(algorithm='fedavg', aggregator='dp'),
     '--aggregator=dp is supported with --algorithm=hypergradient only.'),
    (hypergradient_main.main, dict(dirichlet_alpha='lots'),
     "--dirichlet_alpha must be 'iid' or a positive number"),
    (baffle_experiments.main, dict(experiment='paper', paper_runs=['typo']),
     "--paper_runs: 'typo' is not one of"),
    (baffle_experiments.main, dict(output_dir=None), '--output_dir is required'),
    (hypergradient_experiments.main, dict(experiment='typo'),
     "--experiment='typo' is not one of this script's experiments"),
    (hypergradient_main.main, dict(weighting='learned',
                                   server_optimizer='adam'),
     '--weighting=learned needs --server_optimizer=sgd'),
    (hypergradient_main.main, dict(clients_per_round=30, num_clients=20),
     r'--clients_per_round \(30\) must be <= --num_clients \(20\)'),
    # A grid checks every run's flags before the first run trains.
    (baffle_experiments.main, dict(Ks=['100', 'many']),
     "--Ks: 'many' is not an integer."),
    (baffle_experiments.main, dict(experiment='paper',
                                   paper_runs=['fedsgd_lenet'], lr=-1.0),
     '--lr must be > 0, got -1.0.'),
    (hypergradient_experiments.main, dict(experiment='rates',
                                          tangent_decays=['0.5', '1']),
     r'--tangent_decay must be in \[0, 1\), got 1.0.'),
    (hypergradient_experiments.main, dict(experiment='rates',
                                          post_update_losses=['typo']),
     "--post_update_losses: 'typo' is not one of"),
    (hypergradient_experiments.main, dict(experiment='weighting',
                                          fad_mode='reverse'),
     '--weighting=learned needs --algorithm=hypergradient'),
])
def test_a_bad_flag_exits_with_one_line_naming_it_before_any_work(
    main, values, message, tmp_path, capsys):
  # Before, each was a ValueError traceback.
  output_dir = tmp_path / 'run'
  with flagsaver.flagsaver(**{'output_dir': str(output_dir), **values}):
    with pytest.raises(SystemExit) as exit_info:
      main(['binary'])
  assert exit_info.value.code == 2
  printed = capsys.readouterr().err
  assert re.match('error: ' + message, printed), printed
  assert printed.count('\n') == 1
  assert not output_dir.exists()


def test_worker_failure_exits_naming_it_and_how_to_resume(tmp_path, capsys):
  # The saved state a run leaves after round 4.
  loop = asyncio.new_event_loop()  # asyncio.run would unset TFF's loop.
  loop.run_until_complete(run_dir.ProgramStateManager(str(tmp_path)).save(
      {'w': np.zeros([2], np.float32)}, 4))
  loop.close()

  def run():
    raise local_workers.WorkerUnavailableError(
        '127.0.0.1:9', 'stopped responding (UNAVAILABLE: connection refused).')

  with flagsaver.flagsaver(output_dir=str(tmp_path), save_every=2):
    with pytest.raises(SystemExit) as exit_info:
      experiment.run_main(run, ['binary'])
  assert exit_info.value.code == 3
  message = capsys.readouterr().err
  assert message.startswith('error: TFF worker 127.0.0.1:9: stopped responding')
  assert (f'The state of round 4 is saved in {tmp_path}: run the same command '
          'again') in message


def test_federated_evaluation_is_tffs_build_fed_eval_on_the_same_weights():
  with flagsaver.flagsaver(task='digits', num_clients=6, model='linear'):
    task = experiment.load_task(pad_digits_to_32x32=False)
  rng = np.random.default_rng(0)
  weights = tff.learning.models.ModelWeights(
      trainable=[rng.normal(size=np.shape(w)).astype(np.float32) * 0.1
                 for w in task.model.initial_weights[0]],
      non_trainable=[])
  some = experiment.evaluator(task, eval_clients=3)(weights)

  by_hand = tff.learning.algorithms.build_fed_eval(task.model)
  state = by_hand.set_model_weights(by_hand.initialize(), weights)
  test_ids = sorted(task.test_clients.client_ids)[:3]
  expected = by_hand.next(state, [
      task.test_clients.create_tf_dataset_for_client(c).batch(64)
      for c in test_ids]).metrics['client_work']['eval'][
          'current_round_metrics']
  assert some['federated'] == pytest.approx(expected, rel=1e-6)
  assert some['federated']['num_examples'] < 1000  # Three of ten clients.

  # On every test client, the example-weighted federated accuracy is the
  # central accuracy on the same 1,000 images.
  everyone = experiment.evaluator(task, eval_clients=0)(weights)
  assert everyone['federated']['num_examples'] == 1000
  assert everyone['federated']['accuracy'] == pytest.approx(
      everyone['central']['accuracy'], abs=1e-6)
  assert everyone['federated']['loss'] == pytest.approx(
      everyone['central']['loss'], rel=1e-5)


@pytest.mark.parametrize('rounds, eval_every, evaluated', [
    (2, 1, [0, 1, 2]),  # The loop evaluates the last round: kept.
    (3, 2, [0, 2, 3]),  # It does not: the final state is evaluated once.
])
def test_the_final_state_is_evaluated_once(rounds, eval_every, evaluated,
                                           tmp_path, monkeypatch):
  evaluator = experiment.evaluator
  calls = []

  def counting_evaluator(task, eval_clients):
    evaluate = evaluator(task, eval_clients)

    def counted(weights):
      calls.append(weights)
      return evaluate(weights)
    return counted

  monkeypatch.setattr(experiment, 'evaluator', counting_evaluator)
  with flagsaver.flagsaver(output_dir=str(tmp_path), rounds=rounds,
                           eval_every=eval_every, num_clients=4,
                           clients_per_round=2, batch_size=32, save_every=0):
    summary = hypergradient_main.run()
  assert len(calls) == len(evaluated)
  assert sorted(int(r) for r in summary['accuracy_by_round']) == evaluated
  # The summary's final accuracy is that of the last state evaluated.
  assert summary['final_test_accuracy'] == summary['accuracy_by_round'][
      str(rounds)]


@pytest.mark.parametrize('binary', [hypergradient_main, baffle_main])
@pytest.mark.parametrize('task_name', tasks.TASK_NAMES)
def test_each_task_runs_through_each_binary_on_synthetic_data(
    tmp_path, binary, task_name):
  with flagsaver.flagsaver(
      output_dir=str(tmp_path), task=task_name, use_synthetic_data=True,
      rounds=1, clients_per_round=2, batch_size=2, max_elements=4,
      eval_every=1, eval_clients=1, eval_batch_size=4, save_every=0, K=2):
    summary = binary.run()
  assert summary['test_accuracy_from'] == 'federated'
  assert summary['final_central_test'] is None
  assert task_name in summary['task'] and 'synthetic' in summary['task']
  federated = summary['final_federated_test']
  assert np.isfinite(federated['loss']), federated
  assert 0.0 <= summary['final_test_accuracy'] <= 1.0
  assert set(summary['accuracy_by_round']) == {'0', '1'}
  metrics = experiment.read_metrics(str(tmp_path))[1]
  assert np.isfinite(metrics['client_work/train/loss'])


@pytest.mark.parametrize('values, message', [
    (dict(task='cifar100_image', model='lenet'), '--model and --activation '
     'apply to'),
    (dict(task='cifar100_image', activation='relu'), '--model and '
     '--activation apply to'),
    (dict(model='linear', activation='relu'), '--activation applies to '
     '--model=lenet|wrn'),
    (dict(task='digits', use_synthetic_data=True),
     '--use_synthetic_data applies to'),
    (dict(task='cifar100_image', task_model='vgg'),
     "--task_model='vgg' is not a model of --task=cifar100_image"),
    (dict(max_elements=-1), '--max_elements must be >= 0'),
    (dict(eval_clients=-2), '--eval_clients must be >= 0'),
])
def test_bad_task_flags_are_named(values, message):
  with flagsaver.flagsaver(**values):
    with pytest.raises(ValueError, match=message):
      experiment.validate_task_flags()


def test_each_client_of_a_round_is_shuffled_with_its_own_seed():
  # The embedded digits' IID clients hold their examples in index order, in
  # which labels nearly repeat 0..9: one shuffle seed for all clients of a
  # round gave every client's first batch nearly the same labels (80% of
  # positions agreed), so a round's 10 batches were ~1 draw of 32 labels.
  with flagsaver.flagsaver(task='digits', model='linear', num_clients=10,
                           dirichlet_alpha='iid', batch_size=32,
                           client_epochs=1, max_elements=0, seed=0):
    task = experiment.load_task(pad_digits_to_32x32=False)
    select = experiment.client_selector(task, clients_per_round=10, seed=0,
                                        batches_per_client=1)
    first_batches = [next(iter(d))['y'].numpy() for d in select(1)]
    again = [next(iter(d))['y'].numpy() for d in select(1)]
  agreement = np.mean([np.mean(a == b) for i, a in enumerate(first_batches)
                       for b in first_batches[i + 1:]])
  # Independent shuffles of 10 balanced classes agree at ~10% of positions.
  assert agreement < 0.2, agreement
  for a, b in zip(first_batches, again):  # A resumed run sees the same data.
    np.testing.assert_array_equal(a, b)
