"""`kill PID` stops a training binary cleanly: no leaked TFF worker."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tff_fad import runtime

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='uses /proc')
def test_sigterm_stops_the_binary_its_worker_and_says_how_to_resume(
    tmp_path):
  output_dir = tmp_path / 'run'
  argv = [sys.executable, '-m', 'research.hypergradient_fedavg.main',
          f'--output_dir={output_dir}', '--rounds=1000', '--save_every=1',
          '--eval_every=1000', '--num_clients=4', '--clients_per_round=2',
          '--batch_size=32']
  # A session of its own, so the clean-up below can take everything.
  child = subprocess.Popen(argv, cwd=_REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           start_new_session=True,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  started, leaked, stderr = [], [], ''
  try:
    for line in child.stdout:
      if re.match(r'round\s+3/1000\b', line):
        started = runtime.local_worker_pids(child.pid)
        child.send_signal(signal.SIGTERM)
        break
    # A leaked worker would hold the pipes open past the timeout.
    _, stderr = child.communicate(timeout=120)
    deadline = time.monotonic() + 10
    leaked = started
    while leaked and time.monotonic() < deadline:
      time.sleep(0.1)
      leaked = [p for p in started if runtime.is_tff_worker(p)]
  finally:
    try:  # Whatever is left of the session, a leaked worker included.
      os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    child.wait(timeout=60)
  assert started, f'no TFF worker by round 3: test is vacuous\n{stderr[-3000:]}'
  assert child.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert 'stopped by SIGTERM.' in stderr
  assert re.search(r'The state of round \d+ is saved in .*run the same '
                   'command again', stderr), stderr[-3000:]
  assert not leaked, f'TFF worker {leaked} outlived the stopped binary'
