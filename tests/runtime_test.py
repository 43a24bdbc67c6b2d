"""Tests that no TFF worker_binary outlives the process that started it."""

import gc
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tff_fad import runtime

# Generous: a cold `import tensorflow_federated` takes ~10 s, much more on a
# loaded 2-core machine running Bazel tests in parallel.
_CHILD_TIMEOUT_SECONDS = 600
# Once the child has exited, its stdout/stderr must reach EOF promptly; a
# leaked worker holds them open.
_PIPE_GRACE_SECONDS = 30

# Runs a tiny federated computation in TFF's default (C++ worker) context,
# writes the pids of the workers it started to a file, and exits normally.
_CHILD_PROGRAM = textwrap.dedent("""
    import sys
    import numpy as np
    import tff_fad  # Registers the worker clean-up at exit.
    from tff_fad import runtime
    import tensorflow_federated as tff

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def total(values):
      return tff.federated_sum(values)

    result = total([1.0, 2.0, 3.5])
    with open(sys.argv[1], 'w') as f:
      f.write(' '.join(str(p) for p in runtime.local_worker_pids()))
    print('RESULT', float(result), flush=True)
""")


def _tff_worker_path() -> str:
  spec = importlib.util.find_spec('tensorflow_federated')
  package_dir = list(spec.submodule_search_locations)[0]
  return os.path.realpath(os.path.join(package_dir, 'data', 'worker_binary'))


def _is_worker(pid: int, worker_path: str) -> bool:
  """True if `pid` is a live (not zombie) process running `worker_path`."""
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      argv0 = f.read().split(b'\0', 1)[0].decode(errors='replace')
  except OSError:
    return False
  return bool(argv0) and os.path.realpath(argv0) == worker_path


def _kill(pids):
  for pid in pids:
    try:
      os.kill(pid, 9)
    except ProcessLookupError:
      pass


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='uses /proc')
def test_worker_does_not_outlive_python_process(tmp_path):
  worker_path = _tff_worker_path()
  pid_file = tmp_path / 'worker_pids'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  child = subprocess.Popen(
      [sys.executable, '-c', _CHILD_PROGRAM, str(pid_file)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=env,
  )
  # communicate() waits for EOF on both pipes: a worker that outlives the
  # child still holds them open and keeps it waiting.
  start = time.monotonic()
  exited_at = None
  while True:
    try:
      stdout, stderr = child.communicate(timeout=2)
      hung = False
      break
    except subprocess.TimeoutExpired:
      now = time.monotonic()
      if child.poll() is not None:
        exited_at = exited_at or now
        if now - exited_at > _PIPE_GRACE_SECONDS:
          hung = True
          break
      elif now - start > _CHILD_TIMEOUT_SECONDS:
        hung = True
        break
  worker_pids = [int(p) for p in pid_file.read_text().split()] if (
      pid_file.exists()) else []
  leaked = [p for p in worker_pids if _is_worker(p, worker_path)]
  if hung:
    _kill(leaked)  # Free the pipes, then collect what the child printed.
    child.kill()
    stdout, stderr = child.communicate()
  tail = stderr.decode(errors='replace')[-3000:]

  assert not hung, (
      f'child (exit code {child.returncode}) kept stdout/stderr open: '
      f'leaked workers {leaked}\n{tail}')
  assert child.returncode == 0, tail
  assert b'RESULT 6.5' in stdout, tail
  # The check is only meaningful if TFF really started a worker.
  assert worker_pids, 'the child started no worker_binary; test is vacuous'
  assert not leaked, f'worker_binary {leaked} ({worker_path}) outlived child'


# Replacing the context below garbage-collects TFF's ServiceManager, whose
# __del__ signals the already stopped worker and raises ProcessLookupError.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_shutdown_local_workers_stops_in_process_worker():
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
  def total(values):
    return tff.federated_sum(values)

  assert total([1.0, 2.0]) == pytest.approx(3.0)
  started = runtime.local_worker_pids()
  assert started, 'TFF ran without starting a local worker_binary'
  worker_path = _tff_worker_path()
  assert all(_is_worker(p, worker_path) for p in started)
  try:
    assert runtime.shutdown_local_workers(timeout_seconds=10) == len(started)
    assert runtime.local_worker_pids() == []
    assert not any(_is_worker(p, worker_path) for p in started)
    # Safe to call again.
    assert runtime.shutdown_local_workers() == 0
  finally:
    # The context that owned the stopped worker cannot restart it (TFF
    # os.kill()s the already reaped pid), so give later tests a fresh one.
    tff.backends.native.set_sync_local_cpp_execution_context()
    gc.collect()
  assert total([2.0, 5.0]) == pytest.approx(7.0)


def test_termination_signals_raise_and_keep_existing_handlers():
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
  custom = lambda signum, frame: None
  try:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, custom)
    runtime.exit_on_termination_signals()
    assert signal.getsignal(signal.SIGHUP) is custom  # Left alone.
    with pytest.raises(runtime.TerminatedBySignal) as raised:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)  # The handler runs at the next bytecode boundary.
    assert raised.value.code == 128 + signal.SIGTERM
    assert raised.value.signal_name == 'SIGTERM'
    # Clean-up is under way: a second signal is ignored.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGHUP) is custom
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def test_a_worker_started_from_a_background_job_stops_on_sigint():
  """A shell starts background jobs (`make test &`) with SIGINT ignored and
  exec keeps that: TFF's worker then ignored the SIGINT that stops it, and
  restarting the local context waited for it forever."""
  code = textwrap.dedent('''
      import shutil
      import signal
      signal.signal(signal.SIGINT, signal.SIG_IGN)  # As in a background job.
      from tff_fad import runtime
      child = runtime.popen_dying_with_parent([shutil.which('sleep'), '60'])
      import time
      time.sleep(0.5)  # Exec'd into sleep.
      child.send_signal(signal.SIGINT)
      print(child.wait(timeout=20))
  ''')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(-signal.SIGINT)
