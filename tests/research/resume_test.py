"""A training binary killed mid-run resumes to the uninterrupted result.

Each binary runs uninterrupted (in this process, once per module), and
killed with SIGKILL after round 5 (a real separate process; the last saved
state is round 4) then restarted (in this process) on the killed run's output
directory. Hypergradient FedAvg is also killed at random moments, inside
saves too, several times in a row. Every restarted run must end with the same
model, the same metrics.csv (every round exactly once) and the same summary
as the uninterrupted one, up to float32 rounding.
"""

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf

from research import experiment
from research import run_dir
from research.baffle import main as baffle_main
from research.hypergradient_fedavg import main as hypergradient_main

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_ROUNDS = 8
_KILL_AFTER_ROUND = 5
# float32 rounding of sums taken in a different order (see below); a wrong
# round, a lost optimizer state or a reused seed differs by far more.
_RTOL = 1e-5
# Every flag whose default a binary sets (experiment.set_flag_defaults) is
# given: in this process both binaries are imported, and the last import
# would otherwise decide the in-process defaults.
_COMMON = dict(rounds=_ROUNDS, save_every=2, eval_every=2, num_clients=8,
               clients_per_round=3, seed=4, dirichlet_alpha='0.5',
               client_lr=0.05, dp_clip=1.0)
_BINARIES = {
    'hypergradient_fedavg': (hypergradient_main, dict(batch_size=32)),
    'baffle': (baffle_main, dict(K=8, batch_size=16)),
}


@pytest.fixture(autouse=True, scope='module')
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS(['resume_test'])


def _run_in_process(module, output_dir, extra):
  with flagsaver.flagsaver(output_dir=output_dir, **{**_COMMON, **extra}):
    return module.run()


def _start(module, output_dir, extra, log):
  argv = [sys.executable, '-m', module.__name__, f'--output_dir={output_dir}']
  argv += [f'--{k}={v}' for k, v in {**_COMMON, **extra}.items()]
  # A session of its own, so the clean-up can take whatever is left.
  return subprocess.Popen(argv, cwd=_REPO, stdout=subprocess.PIPE,
                          stderr=log, text=True, start_new_session=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))


def _kill(child, log_path, printed=()):
  """SIGKILLs the Python process only, as the OOM killer would."""
  try:
    if child.poll() is None:
      child.kill()
  finally:
    try:
      os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    child.wait(timeout=60)
  assert child.returncode == -signal.SIGKILL, (
      f'the run was not killed mid-way:\n{"".join(printed)}\n'
      f'{open(log_path).read()[-3000:]}')


def _run_and_kill(module, output_dir, extra, log_path):
  with open(log_path, 'w') as log:
    child = _start(module, output_dir, extra, log)
    printed = []
    try:
      for line in child.stdout:
        printed.append(line)
        if re.match(rf'round\s+{_KILL_AFTER_ROUND}/{_ROUNDS}\b', line):
          break
    finally:
      _kill(child, log_path, printed)


def _metrics(output_dir):
  """metrics.csv rows, without the wall-clock columns."""
  with open(os.path.join(output_dir, 'metrics.csv'), newline='') as f:
    return [{k: v for k, v in row.items() if 'time_in_seconds' not in k}
            for row in csv.DictReader(f)]


def _final_model(output_dir):
  path = os.path.join(output_dir, 'program_state', f'program_state_{_ROUNDS}')
  return [np.asarray(v) for v in tf.nest.flatten(tf.saved_model.load(path)())]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, parsed_flags):
  """name -> (output directory, summary) of an uninterrupted run, made once."""
  del parsed_flags  # Only needed first.
  runs = {}

  def get(name):
    if name not in runs:
      module, extra = _BINARIES[name]
      output_dir = str(tmp_path_factory.mktemp(f'{name}_uninterrupted'))
      runs[name] = output_dir, _run_in_process(module, output_dir, extra)
    return runs[name]

  return get


def _assert_same_results(reference_dir, reference, resumed_dir, resumed):
  # Every round once, with the uninterrupted run's values: the state is saved
  # exactly and all randomness is a function of (seed, round). Not bit for
  # bit: TFF's runtime adds client values in the order they finish, so even
  # two uninterrupted runs differ in the last float32 bits.
  resumed_rows, reference_rows = _metrics(resumed_dir), _metrics(reference_dir)
  assert [int(r['round']) for r in resumed_rows] == list(range(_ROUNDS + 1))
  for got, want in zip(resumed_rows, reference_rows, strict=True):
    assert got.keys() == want.keys()
    for key in want:
      if want[key] == '' or got[key] == '':
        assert got[key] == want[key], (want['round'], key)
      else:
        np.testing.assert_allclose(float(got[key]), float(want[key]),
                                   rtol=_RTOL, err_msg=f'round {want["round"]}'
                                   f' {key}')
  for a, b in zip(_final_model(reference_dir), _final_model(resumed_dir),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=_RTOL, atol=1e-6)
  with open(os.path.join(resumed_dir, 'summary.json')) as f:
    on_disk = json.load(f)
  for key in ('final_test_accuracy', 'final_test_loss',
              'final_server_learning_rate'):
    assert resumed.get(key) == pytest.approx(reference.get(key), rel=_RTOL)
    assert on_disk.get(key) == pytest.approx(reference.get(key), rel=_RTOL)
  for key in ('accuracy_by_round', 'server_learning_rate_by_round'):
    if key in reference:
      assert on_disk[key] == pytest.approx(reference[key], rel=_RTOL)
  assert on_disk['diverged'] is reference['diverged'] is False


# Hypergradient FedAvg: see the test with random kills below.
@pytest.mark.parametrize('name', ['baffle'])
def test_killed_run_resumes_to_the_uninterrupted_result(name, uninterrupted,
                                                        tmp_path):
  module, extra = _BINARIES[name]
  reference_dir, reference = uninterrupted(name)
  resumed_dir = str(tmp_path / 'killed_and_resumed')

  _run_and_kill(module, resumed_dir, extra, str(tmp_path / 'killed.log'))
  assert run_dir.latest_saved_round(resumed_dir) == 4
  assert not os.path.exists(os.path.join(resumed_dir, 'summary.json'))
  # Round 5's row may or may not have reached the file before the kill.
  killed_rounds = [int(r['round']) for r in _metrics(resumed_dir)]
  assert killed_rounds in (list(range(_KILL_AFTER_ROUND)),
                           list(range(_KILL_AFTER_ROUND + 1)))

  part_start = time.time()
  resumed = _run_in_process(module, resumed_dir, extra)
  part_seconds = time.time() - part_start
  assert resumed['resumed_from_round'] == 4
  assert reference['resumed_from_round'] is None
  _assert_same_results(reference_dir, reference, resumed_dir, resumed)

  # The wall time counts the killed part's kept rounds 0-4 as TFF's loop
  # timed them, and all of this part.
  history = experiment.read_metrics(resumed_dir)

  def recorded_seconds(rounds):
    return sum(history[r].get('training_time_in_seconds', 0.0) +
               history[r].get('evaluation/evaluation_time_in_seconds', 0.0)
               for r in rounds)
  before = recorded_seconds(range(5))
  assert before > 0
  assert resumed['wall_time_seconds_before_resuming'] == round(before, 1)
  assert (before + recorded_seconds(range(5, _ROUNDS + 1)) - 0.1
          <= resumed['wall_time_seconds'] <= before + part_seconds + 0.1)
  assert reference['wall_time_seconds_before_resuming'] == 0


def _state_entries(output_dir):
  try:
    return os.listdir(os.path.join(output_dir, 'program_state'))
  except FileNotFoundError:
    return []


def test_run_killed_at_random_moments_ends_as_the_uninterrupted_one(
    uninterrupted, tmp_path):
  module, extra = _BINARIES['hypergradient_fedavg']
  reference_dir, reference = uninterrupted('hypergradient_fedavg')
  output_dir = str(tmp_path / 'killed_again_and_again')
  extra = dict(extra, save_every=1)  # Saves all the time: more to cut short.
  rng = random.Random(16)
  for attempt in range(5):
    log_path = str(tmp_path / f'killed_{attempt}.log')
    with open(log_path, 'w') as log:
      left_over = set(_state_entries(output_dir))
      child = _start(module, output_dir, extra, log)
      try:
        if attempt % 2 == 0:
          # Inside a save: TFF writes it to program_state_<N>_temp<K> first.
          while child.poll() is None and not any(
              '_temp' in e and e not in left_over
              for e in _state_entries(output_dir)):
            time.sleep(0.001)
        else:
          for line in child.stdout:
            if line.startswith('round'):
              break
          time.sleep(rng.uniform(0.0, 0.3))
      finally:
        _kill(child, log_path)
  assert not os.path.exists(os.path.join(output_dir, 'summary.json'))

  resumed = _run_in_process(module, output_dir, extra)
  _assert_same_results(reference_dir, reference, output_dir, resumed)


def test_resuming_with_other_flags_is_refused_by_name(tmp_path):
  output_dir = str(tmp_path / 'run')
  extra = dict(_BINARIES['baffle'][1], rounds=2)
  _run_in_process(baffle_main, output_dir, extra)
  with pytest.raises(ValueError, match=r'--K=8 \(now 9\)'):
    _run_in_process(baffle_main, output_dir, dict(extra, K=9))
  with pytest.raises(ValueError, match='past --rounds=1'):
    _run_in_process(baffle_main, output_dir, dict(extra, rounds=1))
  # Flags that do not change what is computed may change.
  summary = _run_in_process(baffle_main, output_dir, dict(extra, rounds=3,
                                                          eval_every=3))
  assert summary['resumed_from_round'] == 2
