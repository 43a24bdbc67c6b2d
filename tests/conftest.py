"""Suite-wide pytest hooks for tff_fad's tests."""

import signal

from tff_fad import runtime


def pytest_configure(config):
  """Lets TFF's own workers stop when the suite runs as a background job.

  A shell starts background jobs (`make test &`) with SIGINT ignored, and
  children exec'd from Python inherit that. TFF stops the worker of a
  context it replaces (the tests switch contexts) with SIGINT and waits for
  it without a timeout, so the suite hung there. With Python's handler
  installed, exec'd children start with SIGINT at its default. (tff_fad's
  own local context resets it in its worker shim.)
  """
  del config  # Unused.
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):
  """Stops the TFF worker_binary this test process started.

  TFF 0.87 leaks its C++ worker when Python exits; the orphan keeps the test
  run's stdout/stderr open and can hang CI (`make test | tee log`). `import
  tff_fad` also registers this clean-up with atexit; doing it here as well
  makes the suite fail loudly if a worker cannot be stopped.
  """
  del exitstatus  # Unused.
  runtime.shutdown_local_workers()
  leftover = runtime.local_worker_pids()
  if leftover:
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    if reporter is not None:
      reporter.write_line(
          f'ERROR: TFF worker_binary processes still running: {leftover}',
          red=True,
      )
    session.exitstatus = 1
