"""A stopped or killed training binary leaves no TFF worker behind."""

import os
import re
import signal
import subprocess
import sys
import time

from absl import flags
from absl.testing import flagsaver
import pytest

from research import run_dir
from research.hypergradient_fedavg import main as hypergradient_main
from tff_fad import runtime

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_ARGS = ['--rounds=1000', '--save_every=1', '--eval_every=1000',
         '--num_clients=4', '--clients_per_round=2', '--batch_size=32']


def _start(output_dir, module='research.hypergradient_fedavg.main',
           extra_args=()):
  argv = [sys.executable, '-m', module,
          f'--output_dir={output_dir}'] + _ARGS + list(extra_args)
  # A session of its own, so the clean-up below can take everything.
  return subprocess.Popen(argv, cwd=_REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          start_new_session=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))


def _workers_at_round_3(child):
  for line in child.stdout:
    if re.match(r'round\s+3/1000\b', line):
      return runtime.local_worker_pids(child.pid)
  return []


def _kill(pids):
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _left_alive(pids):
  """The TFF workers among `pids` still running a few seconds on."""
  deadline = time.monotonic() + 10
  alive = pids
  while alive and time.monotonic() < deadline:
    time.sleep(0.1)
    alive = [p for p in pids if runtime.is_tff_worker(p)]
  return alive


def _stop_at_round_3(child, signum, to_group=False):
  """Signals `child` once it has run round 3; checks that it stopped, said
  so and took its TFF worker with it; returns its stderr."""
  started, leaked, stderr = [], [], ''
  try:
    started = _workers_at_round_3(child)
    if to_group:
      os.killpg(child.pid, signum)
    else:
      child.send_signal(signum)
    # A leaked worker would hold the pipes open past the timeout.
    _, stderr = child.communicate(timeout=120)
    leaked = _left_alive(started)
  finally:
    _kill(started)
    try:  # Whatever is left of the session.
      os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    child.wait(timeout=60)
  assert started, f'no TFF worker by round 3: test is vacuous\n{stderr[-3000:]}'
  assert child.returncode == 128 + signum, stderr[-3000:]
  assert f'stopped by {signal.Signals(signum).name}.' in stderr
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert not leaked, f'TFF worker {leaked} outlived the stopped binary'
  return stderr


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='uses /proc')
@pytest.mark.parametrize('signum, to_group', [
    (signal.SIGTERM, False),  # `kill PID`.
    (signal.SIGINT, True),  # Ctrl-C: the terminal signals the whole group.
])
def test_a_signal_stops_the_binary_its_worker_and_says_how_to_resume(
    signum, to_group, tmp_path):
  stderr = _stop_at_round_3(_start(tmp_path / 'run'), signum, to_group)
  assert re.search(r'The state of round \d+ is saved in .*run the same '
                   'command again', stderr), stderr[-3000:]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='uses /proc')
@pytest.mark.parametrize('module, args', [
    ('research.baffle.experiments',
     ['--experiment=estimators', '--Ks=4', '--estimators=forward',
      '--baselines=']),
    ('research.hypergradient_fedavg.experiments',
     ['--experiment=weighting', '--seeds=0']),
])
def test_a_signal_stops_an_experiment_grid_and_says_how_to_resume(
    module, args, tmp_path):
  stderr = _stop_at_round_3(_start(tmp_path / 'grid', module, args),
                            signal.SIGTERM)
  assert re.search(r'Run the same command again to go on: each run resumes '
                   r'from its last save in its directory under .*grid',
                   stderr), stderr[-3000:]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='uses /proc')
def test_a_second_run_fails_at_once_and_a_sigkill_frees_pipes_and_lock(
    tmp_path, capsys):
  output_dir = tmp_path / 'run'
  child = _start(output_dir)
  started, leaked, hung = [], [], False
  try:
    started = _workers_at_round_3(child)
    # Two runs on one directory: the second wrote round 0 into the first's
    # metrics.csv and died on the first's program_state_0.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS(['termination_test'])
    with flagsaver.flagsaver(output_dir=str(output_dir), rounds=1000,
                             save_every=1, eval_every=1000, num_clients=4,
                             clients_per_round=2, batch_size=32):
      with pytest.raises(run_dir.RunDirError,
                         match=rf'in use by another run \(pid {child.pid}: '
                         r'\S+ -m research.hypergradient_fedavg.main '):
        hypergradient_main.run()
    # `python -m ... | tee log`: tee returns once nobody holds the pipe open.
    child.kill()  # The Python process only: no clean-up code runs.
    try:
      child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
      hung = True
    leaked = _left_alive(started)
  finally:
    _kill(started)
    try:
      os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    child.wait(timeout=60)
  assert started, 'no TFF worker by round 3: test is vacuous'
  assert not hung, f'the pipes stayed open after SIGKILL: workers {leaked}'
  assert not leaked, f'TFF worker {leaked} outlived the killed binary'
  with run_dir.lock(str(output_dir)):
    pass
  assert f'from a run that ended without releasing it (pid {child.pid}: ' in (
      capsys.readouterr().err)
