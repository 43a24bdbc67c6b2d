"""A training binary killed mid-run resumes to the uninterrupted result.

Each binary runs three times with the same flags and seed: uninterrupted
(in this process), killed with SIGKILL after round 5 (a real separate
process; the last saved state is round 4), and restarted (in this process)
on the killed run's output directory. The restarted run must end with the
same model, the same metrics.csv (every round exactly once) and the same
summary as the uninterrupted one, up to float32 rounding.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf

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


def _run_and_kill(module, output_dir, extra, log_path):
  argv = [sys.executable, '-m', module.__name__, f'--output_dir={output_dir}']
  argv += [f'--{k}={v}' for k, v in {**_COMMON, **extra}.items()]
  with open(log_path, 'w') as log:
    # A session of its own, so the kill takes TFF's worker process too.
    child = subprocess.Popen(argv, cwd=_REPO, stdout=subprocess.PIPE,
                             stderr=log, text=True, start_new_session=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
    printed = []
    try:
      for line in child.stdout:
        printed.append(line)
        if re.match(rf'round\s+{_KILL_AFTER_ROUND}/{_ROUNDS}\b', line):
          os.killpg(child.pid, signal.SIGKILL)
          break
    finally:
      if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
      child.wait(timeout=60)
  assert child.returncode == -signal.SIGKILL, (
      f'the run was not killed mid-way:\n{"".join(printed)}\n'
      f'{open(log_path).read()[-3000:]}')


def _metrics(output_dir):
  """metrics.csv rows, without the wall-clock columns."""
  with open(os.path.join(output_dir, 'metrics.csv'), newline='') as f:
    return [{k: v for k, v in row.items() if 'time_in_seconds' not in k}
            for row in csv.DictReader(f)]


def _final_model(output_dir):
  path = os.path.join(output_dir, 'program_state', f'program_state_{_ROUNDS}')
  return [np.asarray(v) for v in tf.nest.flatten(tf.saved_model.load(path)())]


@pytest.mark.parametrize('name', sorted(_BINARIES))
def test_killed_run_resumes_to_the_uninterrupted_result(name, tmp_path):
  module, extra = _BINARIES[name]
  reference_dir = str(tmp_path / 'uninterrupted')
  resumed_dir = str(tmp_path / 'killed_and_resumed')
  reference = _run_in_process(module, reference_dir, extra)

  _run_and_kill(module, resumed_dir, extra, str(tmp_path / 'killed.log'))
  assert run_dir.latest_saved_round(resumed_dir) == 4
  assert not os.path.exists(os.path.join(resumed_dir, 'summary.json'))
  # Round 5's row may or may not have reached the file before the kill.
  killed_rounds = [int(r['round']) for r in _metrics(resumed_dir)]
  assert killed_rounds in (list(range(_KILL_AFTER_ROUND)),
                           list(range(_KILL_AFTER_ROUND + 1)))

  resumed = _run_in_process(module, resumed_dir, extra)
  assert resumed['resumed_from_round'] == 4
  assert reference['resumed_from_round'] is None

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
  for key in ('final_test_accuracy', 'final_test_loss',
              'final_server_learning_rate'):
    assert resumed.get(key) == pytest.approx(reference.get(key), rel=_RTOL)
  with open(os.path.join(resumed_dir, 'summary.json')) as f:
    assert json.load(f)['accuracy_by_round'].keys() == (
        reference['accuracy_by_round'].keys())


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
