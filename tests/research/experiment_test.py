"""Tests of the binaries' shared plumbing: worker flags and failures."""

import asyncio

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

from research import experiment
from research import run_dir
from research.baffle import main as baffle_main
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


def test_reverse_mode_hypergradient_is_refused_on_workers(tmp_path):
  with flagsaver.flagsaver(output_dir=str(tmp_path), fad_mode='reverse',
                           workers=['127.0.0.1:8000']):
    with pytest.raises(ValueError, match='--fad_mode=reverse cannot run on '
                       '--workers'):
      hypergradient_main.run()


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
